"""The official `openai` SDK pointed at the edge works, streaming and not."""

from __future__ import annotations

import openai
from stack_harness import Providers

from gpu_router.stack import Stack


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused-by-the-router", max_retries=0)


def test_chat_completion(stack: Stack, providers: Providers) -> None:
    raw = client(stack).chat.completions.with_raw_response.create(
        model="llama-3.1-8b", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8
    )
    completion = raw.parse()

    assert raw.headers["x-gpu-router-provider"] in providers.urls
    assert completion.choices[0].message.content


def test_streaming_chat_completion(stack: Stack, providers: Providers) -> None:
    stream = client(stack).chat.completions.create(
        model="llama-3.1-8b", messages=[{"role": "user", "content": "Count"}], max_tokens=8, stream=True,
        extra_headers={"x-workload": "batch"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert len(chunks) > 2
    assert text
    assert providers.stats("vast")["requests"] == 1


def test_embeddings_go_cost_first(stack: Stack, providers: Providers) -> None:
    raw = client(stack).embeddings.with_raw_response.create(model="bge-large", input=["a", "b"])

    assert raw.headers["x-gpu-router-provider"] == "vast"
    assert len(raw.parse().data) == 2


def test_unknown_model_raises_not_found(stack: Stack) -> None:
    try:
        client(stack).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError as error:
        assert error.status_code == 404
    else:
        raise AssertionError("an unknown model must be a 404")
