"""Usage normalisation: every dialect, streaming, and estimates for missing or malformed usage."""

from __future__ import annotations

import math
from typing import Any

import pytest
from usage_fixtures import captured_json_usage, compact, make_record, sse

from control_plane.usage.normalise import (
    JSON_ENVELOPE_BYTES,
    SSE_EVENT_BYTES,
    Usage,
    normalise,
)
from simulator.openai_api import Kind, completion_body, plan_generation, stream_chunks
from simulator.profiles import UsageFormat

OPENAI_BODY = {
    "id": "chatcmpl-1", "object": "chat.completion", "model": "o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
              "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 120, "audio_tokens": 0}},
    "system_fingerprint": "fp_1",
}


def test_openai_json_with_cached_and_reasoning_tokens() -> None:
    usage = normalise(make_record(usage_text=captured_json_usage(OPENAI_BODY)), "openai")
    assert usage == Usage(
        input_tokens=1200 - 1024, output_tokens=300 - 120, cached_input_tokens=1024,
        cache_write_tokens=0, reasoning_tokens=120, estimated=False,
        reported={"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
                  "prompt_tokens_details.cached_tokens": 1024,
                  "prompt_tokens_details.audio_tokens": 0,
                  "completion_tokens_details.reasoning_tokens": 120,
                  "completion_tokens_details.audio_tokens": 0})
    total = (usage.input_tokens + usage.cached_input_tokens + usage.output_tokens
             + usage.reasoning_tokens)
    assert total == 1500, "the normalised counts are disjoint and sum to the reported total"


def test_openai_null_details_count_as_zero() -> None:
    text = '"usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12, ' \
           '"prompt_tokens_details": null, "completion_tokens_details": null}}'
    usage = normalise(make_record(usage_text=text), "openai")
    assert (usage.input_tokens, usage.output_tokens, usage.cached_input_tokens,
            usage.reasoning_tokens, usage.estimated) == (9, 3, 0, 0, False)


def test_whole_body_is_read_too() -> None:
    usage = normalise(make_record(usage_text=compact(OPENAI_BODY)), "openai")
    assert (usage.cached_input_tokens, usage.estimated) == (1024, False)


def test_anthropic_json_with_cache_read_and_write() -> None:
    body = {"id": "msg_1", "type": "message", "content": [{"type": "text", "text": "hi"}],
            "usage": {"input_tokens": 50, "cache_creation_input_tokens": 2000,
                      "cache_read_input_tokens": 8000, "output_tokens": 400}}
    usage = normalise(make_record(usage_text=captured_json_usage(body)), "anthropic")
    assert (usage.input_tokens, usage.cached_input_tokens, usage.cache_write_tokens,
            usage.output_tokens, usage.reasoning_tokens) == (50, 8000, 2000, 400, 0)
    assert not usage.estimated
    assert usage.reported["cache_read_input_tokens"] == 8000


def test_anthropic_stream_merges_message_start_and_message_delta() -> None:
    events = [
        {"type": "message_start", "message": {"id": "msg_1", "usage": {
            "input_tokens": 25, "cache_read_input_tokens": 100, "output_tokens": 1}}},
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hello"}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
         "usage": {"output_tokens": 15}},
    ]
    text = "".join(f"event: {e['type']}\ndata: {compact(e)}\n\n" for e in events)
    usage = normalise(make_record(stream=True, usage_text=text), "anthropic")
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens,
            usage.estimated) == (25, 100, 15, False)


def test_openai_stream_reads_the_include_usage_chunk() -> None:
    events: list[dict[str, Any]] = [{"choices": [{"delta": {"content": "a"}}]},
              {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 7,
                                        "total_tokens": 27}}]
    usage = normalise(make_record(stream=True, usage_text=sse(events)), "openai")
    assert (usage.input_tokens, usage.output_tokens, usage.estimated) == (20, 7, False)


@pytest.mark.parametrize("usage_format", [UsageFormat.OPENAI, UsageFormat.ANTHROPIC])
@pytest.mark.parametrize("stream", [False, True])
def test_what_the_simulator_reports_is_what_we_read(usage_format: UsageFormat,
                                                    stream: bool) -> None:
    request = {"model": "m", "messages": [{"role": "user", "content": "x" * 401}],
               "stream": stream, "stream_options": {"include_usage": True}}
    gen = plan_generation(Kind.CHAT, request, model="m", provider="p")
    if stream:
        text = sse(list(stream_chunks(gen, response_id="c", created=1, usage_format=usage_format)))
    else:
        text = captured_json_usage(completion_body(gen, response_id="c", created=1,
                                                   usage_format=usage_format))
    usage = normalise(make_record(stream=stream, usage_text=text), usage_format.value)
    assert (usage.input_tokens, usage.output_tokens, usage.estimated) == (
        gen.prompt_tokens, len(gen.tokens), False)


@pytest.mark.parametrize("stream", [False, True])
def test_provider_that_reports_nothing_is_estimated_from_body_sizes(stream: bool) -> None:
    request = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "x" * 400}],
               "stream": stream}
    gen = plan_generation(Kind.CHAT, request, model="llama-3.1-8b", provider="vast")
    if stream:
        body = sse(list(stream_chunks(gen, response_id="chatcmpl-vast-1", created=1700000000,
                                      usage_format=UsageFormat.NONE)))
    else:
        body = compact(completion_body(gen, response_id="chatcmpl-vast-1", created=1700000000,
                                       usage_format=UsageFormat.NONE))
    record = make_record(stream=stream, usage_text="",
                         request_bytes=len(compact(request)), response_bytes=len(body))
    usage = normalise(record, "none")
    assert usage.estimated and usage.estimate_reason == "provider reports no usage"
    assert usage.reported == {}
    assert usage.input_tokens == math.ceil(record.request_bytes / 4)
    expected_output = (round(record.response_bytes / SSE_EVENT_BYTES) - 2 if stream
                       else math.ceil((record.response_bytes - JSON_ENVELOPE_BYTES) / 4))
    assert usage.output_tokens == expected_output
    # The method is rough but in the right range for the simulator's truth.
    assert gen.prompt_tokens <= usage.input_tokens <= 1.5 * gen.prompt_tokens
    assert len(gen.tokens) / 2 <= usage.output_tokens <= 2 * len(gen.tokens)


MALFORMED = {
    "truncated json": ('"usage":{"prompt_tokens":12,"completion', "not valid JSON"),
    "usage not an object": ('"usage": [1, 2]', "not an object"),
    "no usage key": ('{"id": "x"}', 'no "usage" key'),
    "wrong dialect": ('"usage":{"input_tokens":5,"output_tokens":2}',
                      "usage.prompt_tokens is missing"),
    "string count": ('"usage":{"prompt_tokens":"12","completion_tokens":2}', "'12'"),
    "boolean count": ('"usage":{"prompt_tokens":true,"completion_tokens":2}', "True"),
    "negative count": ('"usage":{"prompt_tokens":-1,"completion_tokens":2}', "negative"),
    "cached above prompt": (
        '"usage":{"prompt_tokens":3,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":9}}',
        "inconsistent"),
    "sse without usage": ("data: {\"choices\":[]}\n\ndata: [DONE]\n\n", "no SSE event"),
    "sse garbage": ("data: {not json\n\n", "no SSE event"),
    "colon missing": ('"usage" {"prompt_tokens":1}', "not followed by ':'"),
    "binary junk": ("\x00\xff\"usage\":\x00", "not valid JSON"),
}


@pytest.mark.parametrize(("text", "why"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_usage_never_raises_and_is_estimated_with_the_reason(text: str,
                                                                       why: str) -> None:
    usage = normalise(make_record(usage_text=text, request_bytes=400, response_bytes=620), "openai")
    assert usage.estimated
    assert why in usage.estimate_reason
    assert (usage.input_tokens, usage.output_tokens) == (100, 100)
    assert usage.cached_input_tokens == usage.cache_write_tokens == usage.reasoning_tokens == 0


def test_missing_usage_is_estimated() -> None:
    usage = normalise(make_record(usage_text="", request_bytes=4, response_bytes=0), "openai")
    assert (usage.estimated, usage.estimate_reason) == (True, "no usage in the response")
    assert (usage.input_tokens, usage.output_tokens) == (1, 0)


def test_unknown_usage_format_is_estimated() -> None:
    usage = normalise(make_record(usage_text='"usage":{}'), "gemini")
    assert usage.estimated and "gemini" in usage.estimate_reason
