"""Every provider's usage dialect -> one `Usage` with disjoint token counts.

Convention (pricing.cost_usd applies the same one): the five counts never overlap,
so their sum is every token billed and each is priced once.

- input_tokens: uncached input. OpenAI: prompt_tokens - prompt_tokens_details.cached_tokens;
  Anthropic: input_tokens (already excludes cache reads and writes).
- cached_input_tokens: input read from the prompt cache. OpenAI cached_tokens;
  Anthropic cache_read_input_tokens.
- cache_write_tokens: input written to the prompt cache. Anthropic
  cache_creation_input_tokens; OpenAI does not report it (0).
- output_tokens: output other than reasoning. OpenAI: completion_tokens -
  completion_tokens_details.reasoning_tokens (OpenAI counts reasoning inside completion);
  Anthropic: output_tokens (thinking is billed as output and not reported apart).
- reasoning_tokens: OpenAI reasoning_tokens; Anthropic 0.

Where usage is read from: a JSON response's `usage` object (`usage_text` starts at
`"usage"`); a stream's SSE events, merged in order so later events win (OpenAI's
stream_options.include_usage chunk; Anthropic's message_start usage then the
message_delta usage with the final output count).

Estimates (usage_format "none", nothing captured, or malformed/inconsistent usage;
`estimated` is True and `estimate_reason` says why; nothing here raises):
- input = ceil(request_bytes / 4): about 4 bytes of English text per token, counting
  the JSON envelope too, so it errs high by a few dozen tokens.
- output, JSON body: ceil((response_bytes - 220) / 4): a chat completion's envelope
  (id, object, created, model, choices, finish_reason) is about 220 bytes compact.
- output, SSE stream: one token per event, events = response_bytes / 220 rounded
  (an OpenAI-style chunk is 200-230 bytes), minus the role and finish events.
Envoy gives body sizes for free, so estimating costs nothing on the client path.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from control_plane.usage.record import RequestRecord

BYTES_PER_TOKEN = 4
JSON_ENVELOPE_BYTES = 220
SSE_EVENT_BYTES = 220
SSE_FRAMING_EVENTS = 2
"""The role chunk and the finish chunk of a chat stream carry no content token."""

_DECODER = json.JSONDecoder()


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Normalised token counts of one request (disjoint: see the module docstring)."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    estimated: bool
    reported: Mapping[str, int] = field(default_factory=dict)
    """The provider's own integer fields, flattened with dots
    ("prompt_tokens_details.cached_tokens"); empty when estimated."""
    estimate_reason: str = ""
    """Why the counts are estimated ("" when reported)."""


class _Unusable(ValueError):
    """Usage text that cannot be read as the provider's format; the message says why."""


def normalise(record: RequestRecord, usage_format: str) -> Usage:
    """The request's token usage, reported when readable, estimated otherwise. `usage_format`
    ("openai" | "anthropic" | "none") is the serving provider's in the ledger's policy
    (PriceBook.usage_format): the policy's fact, not the entry's."""
    if usage_format == "none":
        return estimate(record, "provider reports no usage")
    if usage_format not in _READERS:
        return estimate(record, f"unknown usage_format {usage_format!r}")
    if not record.usage_text.strip():
        return estimate(record, "no usage in the response")
    try:
        raw = _usage_object(record.usage_text)
        return _READERS[usage_format](raw)
    except _Unusable as problem:
        return estimate(record, str(problem))


def estimate(record: RequestRecord, reason: str) -> Usage:
    """Counts from body sizes (method in the module docstring)."""
    input_tokens = math.ceil(max(record.request_bytes, 0) / BYTES_PER_TOKEN)
    if record.stream:
        events = round(max(record.response_bytes, 0) / SSE_EVENT_BYTES)
        output_tokens = max(events - SSE_FRAMING_EVENTS, 0)
    else:
        content = max(record.response_bytes - JSON_ENVELOPE_BYTES, 0)
        output_tokens = math.ceil(content / BYTES_PER_TOKEN)
    return Usage(input_tokens=input_tokens, output_tokens=output_tokens, cached_input_tokens=0,
                 cache_write_tokens=0, reasoning_tokens=0, estimated=True, reported={},
                 estimate_reason=reason)


# --- finding the usage object ---------------------------------------------------------


def _usage_object(text: str) -> dict[str, Any]:
    stripped = text.lstrip()
    if stripped.startswith(("data:", "event:")):
        return _from_sse(stripped)
    return _from_json(stripped)


def _from_json(text: str) -> dict[str, Any]:
    """The object after `"usage":` (the text may go on past it, or be a whole body)."""
    start = text.find('"usage"')
    if start < 0:
        raise _Unusable("no \"usage\" key in the captured text")
    after = text[start + len('"usage"'):].lstrip()
    if not after.startswith(":"):
        raise _Unusable("\"usage\" is not followed by ':'")
    try:
        value, _ = _DECODER.raw_decode(after[1:].lstrip())
    except json.JSONDecodeError as error:
        raise _Unusable(f"usage is not valid JSON: {error.msg} at {error.pos}") from error
    if not isinstance(value, dict):
        raise _Unusable(f"usage is a JSON {type(value).__name__}, not an object")
    return value


def _from_sse(text: str) -> dict[str, Any]:
    """Every event's usage merged in order (a later count replaces an earlier one)."""
    merged: dict[str, Any] = {}
    for payload in _sse_data(text):
        try:
            event = json.loads(payload)
        except json.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        message = event.get("message")
        for usage in (message.get("usage") if isinstance(message, dict) else None,
                      event.get("usage")):
            if isinstance(usage, dict):
                merged.update(usage)
    if not merged:
        raise _Unusable("no SSE event carries a usage object")
    return merged


def _sse_data(text: str) -> Iterator[str]:
    for line in text.splitlines():
        if line.startswith("data:"):
            payload = line[len("data:"):].strip()
            if payload and payload != "[DONE]":
                yield payload


# --- the dialects -----------------------------------------------------------------------


def _count(raw: Mapping[str, Any], key: str, *, required: bool) -> int:
    value = raw.get(key)
    if value is None and not required:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Unusable(f"usage.{key} is {'missing' if value is None else repr(value)}, "
                        "not a token count")
    if value < 0:
        raise _Unusable(f"usage.{key} is negative ({value})")
    return value


def _flatten(raw: Mapping[str, Any], prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    for key, value in raw.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, int) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def _details(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    details = raw.get(key)
    return details if isinstance(details, Mapping) else {}


def _openai(raw: dict[str, Any]) -> Usage:
    prompt = _count(raw, "prompt_tokens", required=True)
    completion = _count(raw, "completion_tokens", required=True)
    cached = _count(_details(raw, "prompt_tokens_details"), "cached_tokens", required=False)
    reasoning = _count(_details(raw, "completion_tokens_details"), "reasoning_tokens",
                       required=False)
    if cached > prompt or reasoning > completion:
        raise _Unusable(f"inconsistent usage: cached {cached} of prompt {prompt}, "
                        f"reasoning {reasoning} of completion {completion}")
    return Usage(input_tokens=prompt - cached, output_tokens=completion - reasoning,
                 cached_input_tokens=cached, cache_write_tokens=0, reasoning_tokens=reasoning,
                 estimated=False, reported=_flatten(raw))


def _anthropic(raw: dict[str, Any]) -> Usage:
    return Usage(
        input_tokens=_count(raw, "input_tokens", required=True),
        output_tokens=_count(raw, "output_tokens", required=True),
        cached_input_tokens=_count(raw, "cache_read_input_tokens", required=False),
        cache_write_tokens=_count(raw, "cache_creation_input_tokens", required=False),
        reasoning_tokens=0, estimated=False, reported=_flatten(raw))


_READERS = {"openai": _openai, "anthropic": _anthropic}
