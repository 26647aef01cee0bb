"""The OpenAI wire shapes a simulated provider reads and writes, as pure functions.

Request bodies are validated into a `Generation` (what to answer) and every response body is
built from it, so the server only decides when to send what. Token counts are made up but
consistent: prompt tokens = ceil(prompt characters / 4), completion tokens = one per word.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from simulator.profiles import UsageFormat

DEFAULT_COMPLETION_TOKENS = 16
EMBEDDING_DIM = 8

_FILLER = (
    "the",
    "router",
    "picked",
    "this",
    "provider",
    "for",
    "cost",
    "and",
    "latency",
    "so",
    "here",
    "is",
    "a",
    "short",
    "answer",
    "from",
    "a",
    "warm",
    "GPU",
)


class ApiError(Exception):
    """A request the API refuses, carried to the client as an OpenAI-style error."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        type: str = "invalid_request_error",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)


def error_body(message: str, *, type: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class Kind(enum.Enum):
    CHAT = "chat"
    COMPLETION = "completion"


@dataclass(frozen=True, slots=True, kw_only=True)
class Generation:
    """What one chat or text completion request is answered with."""

    kind: Kind
    model: str
    prompt_tokens: int
    tokens: tuple[str, ...]
    """Completion text, one token per element (each but the first starts with a space)."""
    finish_reason: str
    stream: bool
    include_usage: bool


def request_model(body: object) -> str | None:
    """The "model" of a decoded request body, when it has one."""
    if isinstance(body, Mapping):
        model = body.get("model")
        if isinstance(model, str):
            return model
    return None


def require_model(body: Mapping[str, Any], served: Sequence[str], provider: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(
            400, "you must provide a model parameter", code="missing_model", param="model"
        )
    if model not in served:
        raise ApiError(
            404,
            f"The model `{model}` does not exist on {provider}",
            code="model_not_found",
            param="model",
        )
    return model


def prompt_tokens(chars: int) -> int:
    return math.ceil(chars / 4)


def _texts(value: object, param: str) -> list[str]:
    """The strings of a "string or array of strings" parameter."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise ApiError(
        400, f"{param} must be a string or an array of strings", code="invalid_value", param=param
    )


def _message_chars(messages: object) -> int:
    if not isinstance(messages, list) or not messages:
        raise ApiError(
            400, "messages must be a non-empty array", code="invalid_value", param="messages"
        )
    chars = 0
    for message in messages:
        if not isinstance(message, Mapping):
            raise ApiError(
                400, "each message must be an object", code="invalid_value", param="messages"
            )
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(
                len(part["text"])
                for part in content
                if isinstance(part, Mapping) and isinstance(part.get("text"), str)
            )
    return chars


def _max_tokens(body: Mapping[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ApiError(
                400, f"{key} must be a non-negative integer", code="invalid_value", param=key
            )
        return value
    return None


def completion_tokens(provider: str, model: str, count: int) -> tuple[str, ...]:
    """`count` deterministic tokens that name who answered, then filler words."""
    words = [f"[{provider}]", "answering", "as", model, *_FILLER]
    picked = [words[i % len(words)] for i in range(count)]
    return tuple(word if i == 0 else f" {word}" for i, word in enumerate(picked))


def plan_generation(
    kind: Kind, body: Mapping[str, Any], *, model: str, provider: str
) -> Generation:
    """Validate a chat or text completion request body into what to answer."""
    if kind is Kind.CHAT:
        chars = _message_chars(body.get("messages"))
        limit = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    else:
        chars = sum(map(len, _texts(body.get("prompt", ""), "prompt")))
        limit = _max_tokens(body, ("max_tokens",))
    count = DEFAULT_COMPLETION_TOKENS if limit is None else min(limit, DEFAULT_COMPLETION_TOKENS)
    options = body.get("stream_options")
    include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
    return Generation(
        kind=kind,
        model=model,
        prompt_tokens=prompt_tokens(chars),
        tokens=completion_tokens(provider, model, count),
        finish_reason="length"
        if limit is not None and limit < DEFAULT_COMPLETION_TOKENS
        else "stop",
        stream=body.get("stream") is True,
        include_usage=include_usage,
    )


def usage(usage_format: UsageFormat, prompt: int, completion: int) -> dict[str, int] | None:
    """Token usage in the provider's dialect; None when it reports none."""
    if usage_format is UsageFormat.OPENAI:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
    if usage_format is UsageFormat.ANTHROPIC:
        return {"input_tokens": prompt, "output_tokens": completion}
    return None


def _with_usage(body: dict[str, Any], usage_json: dict[str, int] | None) -> dict[str, Any]:
    if usage_json is not None:
        body["usage"] = usage_json
    return body


def _object_name(kind: Kind, chunk: bool) -> str:
    base = "chat.completion" if kind is Kind.CHAT else "text_completion"
    return f"{base}.chunk" if chunk and kind is Kind.CHAT else base


def completion_body(
    gen: Generation, *, response_id: str, created: int, usage_format: UsageFormat
) -> dict[str, Any]:
    """The whole (non-streaming) response."""
    text = "".join(gen.tokens)
    choice: dict[str, Any] = {"index": 0, "finish_reason": gen.finish_reason, "logprobs": None}
    if gen.kind is Kind.CHAT:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    body = {
        "id": response_id,
        "object": _object_name(gen.kind, chunk=False),
        "created": created,
        "model": gen.model,
        "choices": [choice],
    }
    return _with_usage(body, usage(usage_format, gen.prompt_tokens, len(gen.tokens)))


def stream_chunks(
    gen: Generation, *, response_id: str, created: int, usage_format: UsageFormat
) -> Iterator[dict[str, Any]]:
    """The SSE events of a streamed response, in order, before the final "[DONE]".

    Chat: a role chunk, one chunk per token, a finish chunk, and, when the request set
    stream_options.include_usage and the provider reports usage, a usage chunk with no choices.
    """
    envelope = {
        "id": response_id,
        "object": _object_name(gen.kind, chunk=True),
        "created": created,
        "model": gen.model,
    }

    def chunk(piece: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if gen.kind is Kind.CHAT:
            delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
            if piece is not None:
                delta["content"] = piece
            choice["delta"] = delta
        else:
            choice["text"] = piece or ""
        return {**envelope, "choices": [choice]}

    if gen.kind is Kind.CHAT:
        yield chunk(None, None, role=True)
    for token in gen.tokens:
        yield chunk(token, None)
    yield chunk(None, gen.finish_reason)
    usage_json = usage(usage_format, gen.prompt_tokens, len(gen.tokens))
    if gen.include_usage and usage_json is not None:
        yield {**envelope, "choices": [], "usage": usage_json}


def embedding_vector(model: str, text: str) -> list[float]:
    """A deterministic unit vector of EMBEDDING_DIM floats for (model, text)."""
    digest = hashlib.sha256(f"{model}\0{text}".encode()).digest()
    raw = [value / 2**31 - 1.0 for value in struct.unpack(f"<{EMBEDDING_DIM}I", digest)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def embeddings_body(
    body: Mapping[str, Any], *, model: str, usage_format: UsageFormat
) -> dict[str, Any]:
    """The response to POST /v1/embeddings: one vector per input string."""
    inputs = _texts(body.get("input"), "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise ApiError(
            400,
            'encoding_format must be "float" or "base64"',
            code="invalid_value",
            param="encoding_format",
        )
    data = []
    for index, text in enumerate(inputs):
        vector = embedding_vector(model, text)
        encoded: list[float] | str = (
            vector
            if encoding == "float"
            else base64.b64encode(struct.pack(f"<{EMBEDDING_DIM}f", *vector)).decode()
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = prompt_tokens(sum(map(len, inputs)))
    usage_json: dict[str, int] | None
    if usage_format is UsageFormat.OPENAI:
        usage_json = {"prompt_tokens": tokens, "total_tokens": tokens}
    elif usage_format is UsageFormat.ANTHROPIC:
        usage_json = {"input_tokens": tokens}
    else:
        usage_json = None
    return _with_usage({"object": "list", "data": data, "model": model}, usage_json)


def models_body(model_ids: Sequence[str], owner: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": owner}
            for model_id in model_ids
        ],
    }
