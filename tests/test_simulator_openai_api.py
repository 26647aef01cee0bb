"""OpenAI request validation and response shapes, without sockets."""

from __future__ import annotations

from typing import Any

import pytest

from simulator.openai_api import (
    ApiError,
    Generation,
    Kind,
    completion_body,
    completion_tokens,
    embedding_vector,
    embeddings_body,
    plan_generation,
    prompt_tokens,
    require_model,
    stream_chunks,
    usage,
)
from simulator.profiles import UsageFormat

IDS: dict[str, Any] = {"response_id": "chatcmpl-x-1", "created": 1}


def plan(body: dict[str, object], kind: Kind = Kind.CHAT) -> Generation:
    return plan_generation(kind, body, model="m", provider="p")


@pytest.mark.parametrize(("chars", "tokens"), [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2)])
def test_prompt_tokens_round_up_quarter_characters(chars: int, tokens: int) -> None:
    assert prompt_tokens(chars) == tokens


def test_chat_prompt_counts_string_and_text_part_content() -> None:
    gen = plan(
        {
            "messages": [
                {"role": "system", "content": "abcd"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "efgh"},
                        {"type": "image_url", "image_url": {}},
                    ],
                },
            ]
        }
    )
    assert gen.prompt_tokens == 2
    assert (len(gen.tokens), gen.finish_reason, gen.stream) == (16, "stop", False)


@pytest.mark.parametrize(
    ("body", "count", "finish"),
    [
        ({"max_tokens": 3}, 3, "length"),
        ({"max_completion_tokens": 0}, 0, "length"),
        ({"max_tokens": 100}, 16, "stop"),
    ],
)
def test_max_tokens_caps_the_completion(body: dict[str, object], count: int, finish: str) -> None:
    gen = plan({"messages": [{"role": "user", "content": "x"}], **body})
    assert (len(gen.tokens), gen.finish_reason) == (count, finish)


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        (Kind.CHAT, {"messages": []}, "messages"),
        (Kind.CHAT, {"messages": ["hi"]}, "messages"),
        (Kind.CHAT, {"messages": [{"content": "x"}], "max_tokens": -1}, "max_tokens"),
        (Kind.CHAT, {"messages": [{"content": "x"}], "max_tokens": "9"}, "max_tokens"),
        (Kind.COMPLETION, {"prompt": 7}, "prompt"),
    ],
)
def test_invalid_generation_requests(kind: Kind, body: dict[str, object], param: str) -> None:
    with pytest.raises(ApiError) as error:
        plan(body, kind)
    assert (error.value.status, error.value.param) == (400, param)


def test_require_model() -> None:
    assert require_model({"model": "a"}, ("a",), "p") == "a"
    with pytest.raises(ApiError) as missing:
        require_model({}, ("a",), "p")
    assert (missing.value.status, missing.value.code) == (400, "missing_model")
    with pytest.raises(ApiError) as unknown:
        require_model({"model": "b"}, ("a",), "p")
    assert (unknown.value.status, unknown.value.code) == (404, "model_not_found")
    assert unknown.value.body()["error"]["param"] == "model"


def test_completion_tokens_join_into_a_sentence_naming_the_provider() -> None:
    assert "".join(completion_tokens("lambda", "org/m", 4)) == "[lambda] answering as org/m"
    assert len(completion_tokens("p", "m", 40)) == 40


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        (UsageFormat.OPENAI, {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
        (UsageFormat.ANTHROPIC, {"input_tokens": 3, "output_tokens": 4}),
        (UsageFormat.NONE, None),
    ],
)
def test_usage_dialects(fmt: UsageFormat, expected: dict[str, int] | None) -> None:
    assert usage(fmt, 3, 4) == expected


def test_text_completion_stream_has_no_role_chunk() -> None:
    gen = plan(
        {
            "prompt": "abcd",
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        Kind.COMPLETION,
    )
    chunks = list(stream_chunks(gen, usage_format=UsageFormat.OPENAI, **IDS))
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["[p]", " answering", ""]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["total_tokens"] == 3
    assert {c["object"] for c in chunks} == {"text_completion"}


def test_non_streaming_body_without_usage() -> None:
    gen = plan({"messages": [{"content": "x"}]})
    body = completion_body(gen, usage_format=UsageFormat.NONE, **IDS)
    assert "usage" not in body
    assert body["choices"][0]["message"]["content"] == "".join(gen.tokens)


def test_embeddings() -> None:
    body = embeddings_body({"input": "abcdefgh"}, model="e", usage_format=UsageFormat.ANTHROPIC)
    assert body["data"][0]["embedding"] == embedding_vector("e", "abcdefgh")
    assert body["usage"] == {"input_tokens": 2}
    assert embedding_vector("e", "a") != embedding_vector("f", "a")
    with pytest.raises(ApiError):
        embeddings_body(
            {"input": "x", "encoding_format": "int8"}, model="e", usage_format=UsageFormat.OPENAI
        )
    with pytest.raises(ApiError):
        embeddings_body({}, model="e", usage_format=UsageFormat.OPENAI)
