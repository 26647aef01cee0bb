"""A simulated provider over real sockets: the OpenAI API, faults, stats, and the openai SDK."""

from __future__ import annotations

import base64
import json
import socket
import struct
from collections.abc import Iterator

import openai
import pytest
from simulator_fixtures import (
    MODELS,
    call,
    fast_spec,
    poll_until,
    running_sims,
    set_fault,
    stats,
)

from simulator.profiles import SimProfile, UsageFormat
from simulator.server import ProviderSim

CHAT = "/v1/chat/completions"


@pytest.fixture
def sim() -> Iterator[ProviderSim]:
    with running_sims(fast_spec()) as sims:
        yield sims[0]


def chat_body(**extra: object) -> dict[str, object]:
    return {"model": MODELS[0], "messages": [{"role": "user", "content": "12345678"}], **extra}


def sse_events(body: bytes) -> list[str]:
    """The data: payloads of an SSE body, in order."""
    blocks = body.decode().split("\n\n")
    assert blocks[-1] == "", "stream must end with a blank line"
    return [block.removeprefix("data: ") for block in blocks[:-1]]


def test_chat_completion_json(sim: ProviderSim) -> None:
    reply = call(sim.port, "POST", CHAT, chat_body())
    assert reply.status == 200
    assert reply.headers["x-sim-provider"] == "alpha"
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == MODELS[0]
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"].startswith("[alpha] answering as org/model-a")
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 16, "total_tokens": 18}


def test_chat_stream_sends_role_tokens_finish_usage_then_done(sim: ProviderSim) -> None:
    reply = call(
        sim.port,
        "POST",
        CHAT,
        chat_body(stream=True, max_tokens=3, stream_options={"include_usage": True}),
    )
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/event-stream"
    assert reply.headers["transfer-encoding"] == "chunked"
    *events, done = sse_events(reply.body)
    assert done == "[DONE]"
    chunks = [json.loads(event) for event in events]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks[:-1])
    assert text == "[alpha] answering as"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_stream_without_include_usage_has_no_usage_chunk(sim: ProviderSim) -> None:
    reply = call(sim.port, "POST", CHAT, chat_body(stream=True))
    chunks = [json.loads(event) for event in sse_events(reply.body)[:-1]]
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_text_completion(sim: ProviderSim) -> None:
    reply = call(
        sim.port,
        "POST",
        "/v1/completions",
        {"model": MODELS[1], "prompt": "abcde", "max_tokens": 2},
    )
    body = reply.json()
    assert reply.status == 200
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "[alpha] answering"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


def test_embeddings_are_deterministic_unit_vectors(sim: ProviderSim) -> None:
    request = {"model": MODELS[0], "input": ["hello", "world"]}
    first = call(sim.port, "POST", "/v1/embeddings", request).json()
    second = call(sim.port, "POST", "/v1/embeddings", request).json()
    assert first == second
    vectors = [item["embedding"] for item in first["data"]]
    assert [item["index"] for item in first["data"]] == [0, 1]
    assert all(len(vector) == 8 for vector in vectors)
    assert vectors[0] != vectors[1]
    assert sum(x * x for x in vectors[0]) == pytest.approx(1.0)
    assert first["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    encoded = call(
        sim.port, "POST", "/v1/embeddings", {**request, "encoding_format": "base64"}
    ).json()
    decoded = struct.unpack("<8f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert decoded == pytest.approx(vectors[0], abs=1e-6)


def test_models_lists_the_provider_ids(sim: ProviderSim) -> None:
    body = call(sim.port, "GET", "/v1/models").json()
    assert [model["id"] for model in body["data"]] == list(MODELS)
    assert {model["owned_by"] for model in body["data"]} == {"alpha"}


def test_health_is_ok_and_not_counted(sim: ProviderSim) -> None:
    reply = call(sim.port, "GET", "/health")
    assert (reply.status, reply.json()) == (200, {"status": "ok"})
    assert stats(sim.port)["requests"] == 0


def test_unknown_model_is_404_model_not_found(sim: ProviderSim) -> None:
    reply = call(sim.port, "POST", CHAT, chat_body(model="public-name"))
    assert reply.status == 404
    error = reply.json()["error"]
    assert error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "model"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"messages": []}', "missing_model"),
    ],
)
def test_bad_request_bodies_are_400(sim: ProviderSim, raw: bytes, code: str) -> None:
    reply = call(sim.port, "POST", CHAT, raw=raw)
    assert reply.status == 400
    assert reply.json()["error"]["code"] == code


def test_unknown_path_and_wrong_method(sim: ProviderSim) -> None:
    assert call(sim.port, "POST", "/v1/nothing", {}).status == 404
    assert call(sim.port, "GET", CHAT).status == 405


def test_stats_count_requests_by_model_and_path(sim: ProviderSim) -> None:
    call(sim.port, "POST", CHAT, chat_body(), headers={"Authorization": "Bearer sk-test"})
    call(sim.port, "POST", CHAT, chat_body(model="unknown"))
    call(sim.port, "GET", "/v1/models")
    call(sim.port, "GET", "/health")
    body = stats(sim.port)
    assert body["provider"] == "alpha"
    assert body["requests"] == 3
    assert body["by_model"] == {MODELS[0]: 1, "unknown": 1}
    assert body["by_path"] == {CHAT: 2, "/v1/models": 1}
    assert body["last_request"]["path"] == "/v1/models"
    call(sim.port, "POST", CHAT, chat_body(), headers={"Authorization": "Bearer sk-test"})
    last = stats(sim.port)["last_request"]
    assert last["model"] == MODELS[0]
    assert last["headers"]["authorization"] == "Bearer sk-test"
    assert last["body_bytes"] == len(json.dumps(chat_body()).encode())
    assert json.loads(last["body"]) == chat_body()
    assert call(sim.port, "POST", "/_sim/reset").status == 200
    assert stats(sim.port)["requests"] == 0


def test_two_mib_body(sim: ProviderSim) -> None:
    prompt = "x" * (2 * 1024 * 1024)
    reply = call(sim.port, "POST", CHAT, chat_body(messages=[{"role": "user", "content": prompt}]))
    assert reply.status == 200
    assert reply.json()["usage"]["prompt_tokens"] == 512 * 1024
    assert stats(sim.port)["last_request"]["body_bytes"] > 2 * 1024 * 1024


def test_fault_error_with_status(sim: ProviderSim) -> None:
    set_fault(sim.port, mode="error", status=502)
    reply = call(sim.port, "POST", CHAT, chat_body())
    assert reply.status == 502
    assert reply.json()["error"]["code"] == "simulated_error"
    assert call(sim.port, "GET", "/health").status == 502
    assert stats(sim.port)["faults"]["hit"] == 1


def test_fault_rate_limit_has_retry_after(sim: ProviderSim) -> None:
    set_fault(sim.port, mode="rate_limit", retry_after_s=7)
    reply = call(sim.port, "POST", CHAT, chat_body())
    assert reply.status == 429
    assert reply.headers["retry-after"] == "7"
    assert reply.json()["error"]["code"] == "rate_limit_exceeded"
    assert call(sim.port, "GET", "/health").status == 200


def test_fault_no_capacity(sim: ProviderSim) -> None:
    set_fault(sim.port, mode="no_capacity")
    reply = call(sim.port, "POST", CHAT, chat_body())
    assert reply.status == 503
    error = reply.json()["error"]
    assert (error["code"], error["message"]) == ("no_capacity", "no GPU capacity")
    assert call(sim.port, "GET", "/health").status == 200


def test_fault_reset_drops_the_connection(sim: ProviderSim) -> None:
    set_fault(sim.port, mode="reset")
    with pytest.raises(ConnectionError):  # http.client.RemoteDisconnected is one too
        call(sim.port, "POST", CHAT, chat_body())
    assert stats(sim.port)["requests"] == 1


def test_fault_hang_never_answers_until_the_client_leaves(sim: ProviderSim) -> None:
    set_fault(sim.port, mode="hang")
    with pytest.raises(TimeoutError):
        call(sim.port, "POST", CHAT, chat_body(), timeout=0.5)
    set_fault(sim.port, mode="none")
    assert call(sim.port, "POST", CHAT, chat_body()).status == 200


def test_rate_half_hits_exactly_every_other_request(sim: ProviderSim) -> None:
    set_fault(sim.port, mode="error", rate=0.5)
    statuses = [call(sim.port, "POST", CHAT, chat_body()).status for _ in range(6)]
    assert statuses == [503, 200, 503, 200, 503, 200]
    assert call(sim.port, "GET", "/health").status == 200
    faults = stats(sim.port)["faults"]
    assert (faults["seen"], faults["hit"]) == (6, 3)


def test_invalid_fault_is_400_and_changes_nothing(sim: ProviderSim) -> None:
    reply = call(sim.port, "POST", "/_sim/fault", {"mode": "explode"})
    assert reply.status == 400
    assert "mode must be one of" in reply.json()["error"]["message"]
    assert stats(sim.port)["faults"]["mode"] == "none"


def test_latency_override_shows_in_stats(sim: ProviderSim) -> None:
    reply = call(sim.port, "POST", "/_sim/latency", {"ttfb_ms": 5, "ms_per_token": 0})
    assert reply.status == 200
    assert reply.json()["profile"]["ttfb_ms"] == 5.0
    call(sim.port, "POST", "/_sim/latency", {})
    assert stats(sim.port)["profile"]["ttfb_ms"] == 0.0


def test_keep_alive_serves_many_requests_on_one_connection(sim: ProviderSim) -> None:
    request = (
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"
        b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", sim.port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200 OK") == 2
    assert received.rstrip().endswith(b'{"status":"ok"}')


@pytest.mark.parametrize(
    ("usage_format", "usage"),
    [
        (UsageFormat.ANTHROPIC, {"input_tokens": 2, "output_tokens": 16}),
        (UsageFormat.NONE, None),
    ],
)
def test_usage_dialects(usage_format: UsageFormat, usage: dict[str, int] | None) -> None:
    spec = fast_spec(profile=SimProfile(ttfb_ms=0.0, usage_format=usage_format))
    with running_sims(spec) as (sim,):
        body = call(sim.port, "POST", CHAT, chat_body()).json()
        assert body.get("usage") == usage
        streamed = call(
            sim.port, "POST", CHAT, chat_body(stream=True, stream_options={"include_usage": True})
        )
        last = json.loads(sse_events(streamed.body)[-2])
        assert last.get("usage") == usage


def test_health_path_from_spec() -> None:
    with running_sims(fast_spec(health_check_path="/healthz")) as (sim,):
        assert call(sim.port, "GET", "/healthz").json() == {"status": "ok"}
        assert call(sim.port, "GET", "/health").status == 404


def openai_client(sim: ProviderSim) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sim.url}/v1", api_key="sk-sim", max_retries=0, timeout=10)


def test_openai_sdk_chat_and_stream(sim: ProviderSim) -> None:
    client = openai_client(sim)
    completion = client.chat.completions.create(
        model=MODELS[0], messages=[{"role": "user", "content": "hi there"}]
    )
    assert completion.model == MODELS[0]
    assert completion.choices[0].message.content.startswith("[alpha]")
    assert completion.usage is not None and completion.usage.total_tokens == 18
    stream = client.chat.completions.create(
        model=MODELS[0],
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        max_tokens=4,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[alpha] answering as org/model-a"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert stats(sim.port)["last_request"]["headers"]["authorization"] == "Bearer sk-sim"


def test_openai_sdk_embeddings_models_and_errors(sim: ProviderSim) -> None:
    client = openai_client(sim)
    embedding = client.embeddings.create(model=MODELS[1], input="hello")
    assert len(embedding.data[0].embedding) == 8
    assert [model.id for model in client.models.list()] == list(MODELS)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert not_found.value.code == "model_not_found"
    set_fault(sim.port, mode="rate_limit", retry_after_s=3)
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model=MODELS[0], messages=[{"role": "user", "content": "x"}])
    assert limited.value.response.headers["retry-after"] == "3"


def test_stop_ends_a_hanging_request() -> None:
    body = json.dumps(chat_body()).encode()
    request = b"POST %b HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%b" % (
        CHAT.encode(), len(body), body
    )
    with running_sims(fast_spec()) as (hung,):
        set_fault(hung.port, mode="hang")
        client = socket.create_connection(("127.0.0.1", hung.port), timeout=10)
        client.sendall(request)
        poll_until(lambda: stats(hung.port)["faults"]["hit"] == 1, "the request to hang")
    with client:
        assert client.recv(65536) == b""
