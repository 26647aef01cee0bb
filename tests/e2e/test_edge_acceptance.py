"""What the edge accepts, on the real stack (default policy): a request is routed and the provider
is sent exactly the model it was routed and billed by, or it is answered with a clear 4xx; never a
5xx, and every request has its one ledger row, under the edge's own request id.

Requests go out on a raw socket, so any byte can be put in any header or in the body.
"""

from __future__ import annotations

import http.client
import json
import socket
import sqlite3
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml
from polling import eventually
from stack_harness import Providers, audit_trail

from gpu_router.stack import Stack

CHAT = b"/v1/chat/completions"
MODEL = "llama-3.1-8b"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: dict


@dataclass
class Edge:
    """The stack's edge, and every x-request-id sent to it (each request gets a unique one)."""

    stack: Stack
    sent: list[str]

    def send(self, body: bytes, headers: list[tuple[bytes, bytes]] = (), *,
             path: bytes = CHAT, content_type: bytes | None = b"application/json") -> Answer:
        """POST `body` with exactly these header bytes (plus host, content-length, connection and
        a fresh x-request-id unless one is given)."""
        names = {name.lower() for name, _ in headers}
        head = [(b"host", b"gpu-router"), *headers]
        if content_type is not None:
            head.append((b"content-type", content_type))
        if b"x-request-id" not in names:
            rid = f"edge-acceptance-{uuid.uuid4()}"
            head.append((b"x-request-id", rid.encode()))
            self.sent.append(rid)
        head += [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        request = b"POST " + path + b" HTTP/1.1\r\n"
        request += b"".join(name + b": " + value + b"\r\n" for name, value in head) + b"\r\n"
        host, port = self.stack.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(request + body)
            response = http.client.HTTPResponse(sock)
            response.begin()
            data = response.read()
        try:
            decoded = json.loads(data) if data else {}
        except ValueError:
            decoded = {"text": data.decode(errors="replace")}
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, decoded)


@pytest.fixture(scope="module")
def edge(stack: Stack) -> Iterator[Edge]:
    """The edge; once the module's tests are done, every request sent must have one ledger row."""
    sent: list[str] = []
    yield Edge(stack, sent)
    try:
        eventually(lambda: _booked(stack) == Counter(sent), "a ledger row for every request sent")
    except pytest.fail.Exception:
        booked = _booked(stack)
        pytest.fail(f"ledger rows missing: {Counter(sent) - booked}; extra: {booked - Counter(sent)}")


def _booked(stack: Stack) -> Counter[str]:
    """The ledger's rows by the client's request id (this module's requests only)."""
    with sqlite3.connect(stack.log_dir / "ledger.db") as db:
        return Counter(rid for (rid,) in db.execute(
            "select client_request_id from requests where client_request_id like 'edge-acceptance-%'"))


def chat_body(**fields: object) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 4, **fields}).encode()


def served(edge: Edge, providers: Providers, answer: Answer) -> dict:
    """The request the provider that answered received: checks it was sent exactly MODEL, as
    that provider names it (its offering in the policy)."""
    assert answer.status == 200, answer
    provider = answer.headers["x-gpu-router-provider"]
    document = yaml.safe_load(edge.stack.policy.read_text())
    (own_id,) = [m["id"] for p in document["providers"] if p["name"] == provider
                 for m in p["models"] if m["name"] == MODEL]
    last = providers.stats(provider)["last_request"]
    assert last["model"] == own_id
    sent = json.loads(last["body"])
    assert [key for key in sent if key.lower() == "model"] == ["model"]
    return last


def nothing_reached_a_provider(providers: Providers) -> bool:
    return all(providers.stats(name)["requests"] == 0 for name in providers.urls)


SMUGGLING = {
    "escaped duplicate": b'{"model": "llama-3.1-8b", "mod\\u0065l": "gpt-expensive", "messages": []}',
    "plain duplicate": b'{"model": "llama-3.1-8b", "model": "llama-3.1-70b", "messages": []}',
    "case variant": b'{"model": "llama-3.1-8b", "Model": "llama-3.1-70b", "messages": []}',
    "upper case alone": b'{"MODEL": "llama-3.1-70b", "messages": []}',
    "concatenated objects": b'{"model": "llama-3.1-8b"}{"model": "llama-3.1-70b"}',
    "trailing garbage": b'{"model": "llama-3.1-8b", "messages": []} ,"model": "x"}',
    "mismatched brackets": b'{"model": "llama-3.1-8b", "m": [}, "model": "llama-3.1-70b"]}',
    "nul byte": b'{"model": "llama-3.1-8b\x00", "messages": []}',
    "nul between members": b'{"model": "llama-3.1-8b",\x00"model": "x"}',
    "bad escape": b'{"model": "llama-3.1-8b", "p": "\\q"}',
    "truncated unicode escape": b'{"model": "llama-3.1-8b\\u00"}',
    "lone surrogate in the model": b'{"model": "llama-3.1-8b\\ud800", "messages": []}',
    "lone surrogate in a prompt": b'{"model": "llama-3.1-8b", "p": "\\udfff"}',
    "non-UTF-8 in the model": b'{"model": "llama-3.1-8b\xff", "messages": []}',
    "non-UTF-8 in a prompt": b'{"model": "llama-3.1-8b", "messages": [{"content": "\xc3"}]}',
    "lead byte before a quote": b'{"model": "llama-3.1-8b", "p": "\xe0", "model": "x"}',
    "non-UTF-8 in a key": b'{"model": "llama-3.1-8b", "\xfe": 1}',
    "model not a string": b'{"model": {"name": "llama-3.1-8b"}}',
    "unclosed": b'{"model": "llama-3.1-8b", "messages": [',
    "not an object": b'[{"model": "llama-3.1-8b"}]',
}


@pytest.mark.parametrize("body", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_a_body_two_parsers_could_read_differently_is_a_400(
    edge: Edge, providers: Providers, body: bytes
) -> None:
    answer = edge.send(body, [(b"x-gpu-router-model", MODEL.encode())])
    assert answer.status == 400, answer
    assert answer.body["error"]["code"] == "invalid_json"
    assert answer.body["error"]["message"].startswith("the request body cannot be read one way")
    assert nothing_reached_a_provider(providers)


@pytest.mark.parametrize("content_type", [b"application/vnd.foo+json", b"text/plain",
                                          b"application/json\xff", b"multipart/form-data"])
def test_a_non_json_body_with_a_header_model_is_a_415(
    edge: Edge, providers: Providers, content_type: bytes
) -> None:
    answer = edge.send(b'{"model": "llama-3.1-70b", "messages": []}',
                       [(b"x-gpu-router-model", MODEL.encode())], content_type=content_type)
    assert answer.status == 415, answer
    assert answer.body["error"]["code"] == "unsupported_media_type"
    assert nothing_reached_a_provider(providers)


def test_a_header_model_that_conflicts_with_the_body_is_a_400(
    edge: Edge, providers: Providers
) -> None:
    answer = edge.send(chat_body(model="llama-3.1-70b"), [(b"x-gpu-router-model", MODEL.encode())])
    assert answer.status == 400, answer
    assert answer.body["error"]["code"] == "model_conflict"
    assert nothing_reached_a_provider(providers)


def test_a_header_model_alone_is_what_the_provider_gets(edge: Edge, providers: Providers) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    served(edge, providers, edge.send(body, [(b"x-gpu-router-model", MODEL.encode())]))


HEADER_BYTES = [b"\xff", b"\xc0\xaf", b"caf\xe9", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]
"""Not UTF-8: a stray byte, an overlong "/", Latin-1, a surrogate, above U+10FFFF."""
CONTROL_BYTES = [b"ok \x7f", b"a\x01b", b"a\x00b"]
"""Bytes HTTP forbids in a header value: Envoy's codec refuses the request itself."""
PLAIN_HEADERS = [b"user-agent", b"accept", b"x-workload", b"x-request-id", b"openai-organization",
                 b"authorization", b"cookie", b"x-forwarded-for", b"x-custom"]


@pytest.mark.parametrize("value", HEADER_BYTES)
@pytest.mark.parametrize("name", PLAIN_HEADERS)
def test_any_bytes_in_a_header_still_route_the_model_they_were_billed_by(
    edge: Edge, providers: Providers, name: bytes, value: bytes
) -> None:
    headers = [(name, value)]
    if name == b"x-request-id":  # still unique, so the ledger check can find it
        rid = f"edge-acceptance-{uuid.uuid4()}"
        headers = [(name, rid.encode() + value)]
        edge.sent.append(rid + "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in value))
    served(edge, providers, edge.send(chat_body(), headers))


@pytest.mark.parametrize("value", CONTROL_BYTES)
@pytest.mark.parametrize("name", [b"user-agent", b"x-gpu-router-model", b"x-request-id"])
def test_a_control_byte_in_a_header_is_a_400_from_envoy(
    edge: Edge, providers: Providers, name: bytes, value: bytes
) -> None:
    """Refused before any filter runs (no request, so no ledger row: the id is not tracked)."""
    answer = edge.send(chat_body(), [(name, value), (b"x-request-id", b"control-byte")]
                       if name != b"x-request-id" else [(name, value)])
    assert answer.status == 400, answer
    assert nothing_reached_a_provider(providers)


@pytest.mark.parametrize("value", HEADER_BYTES)
@pytest.mark.parametrize("name", [b"x-gpu-router-model", b"x-gpu-router-strategy"])
def test_a_routing_header_that_is_not_text_is_a_400(
    edge: Edge, providers: Providers, name: bytes, value: bytes
) -> None:
    answer = edge.send(chat_body(), [(name, b"x" + value)])
    assert 400 <= answer.status < 500, answer
    assert nothing_reached_a_provider(providers)


def test_a_path_that_is_not_ascii_is_a_400_from_envoy(edge: Edge, providers: Providers) -> None:
    """Refused by Envoy's HTTP codec before any filter runs (so no ledger row: untracked id)."""
    for path in (CHAT + b"?q=\xff", CHAT + b"\xff", b"/v1/\xc0\xafchat/completions"):
        answer = edge.send(chat_body(), [(b"x-request-id", b"bad-path")], path=path)
        assert answer.status == 400, (path, answer)
    assert nothing_reached_a_provider(providers)


def test_client_headers_that_choose_accounts_or_hide_usage_never_reach_the_provider(
    edge: Edge, providers: Providers
) -> None:
    dropped = [(b"openai-organization", b"org-someone-else"), (b"openai-project", b"proj-x"),
               (b"openai-beta", b"assistants=v2"), (b"anthropic-beta", b"context-1m"),
               (b"cookie", b"session=1"), (b"x-forwarded-for", b"203.0.113.9"),
               (b"forwarded", b"for=203.0.113.9"), (b"x-real-ip", b"203.0.113.9"),
               (b"x-forwarded-host", b"evil.example")]
    last = served(edge, providers, edge.send(chat_body(), [*dropped, (b"accept-encoding", b"gzip")]))
    received = {name.lower() for name in last["headers"]}
    assert received.isdisjoint(name.decode() for name, _ in dropped)
    assert last["headers"]["accept-encoding"] == "identity"


def test_ledger_and_audit_ids_are_the_edges_and_the_clients_is_kept(
    edge: Edge, providers: Providers, stack: Stack
) -> None:
    rid = f"edge-acceptance-{uuid.uuid4()}"
    edge.sent.append(rid)
    first = served(edge, providers, edge.send(chat_body(), [(b"x-request-id", rid.encode())]))
    edge.sent.append(rid)  # the same id again: another client's collision
    second = served(edge, providers, edge.send(chat_body(), [(b"x-request-id", rid.encode())]))
    edge_ids = {first["headers"]["x-request-id"], second["headers"]["x-request-id"]}
    assert len(edge_ids) == 2 and rid not in edge_ids

    def booked() -> list[tuple[str, str]] | None:
        with sqlite3.connect(stack.log_dir / "ledger.db") as db:
            rows = db.execute("select request_id, model from requests where client_request_id = ?",
                              (rid,)).fetchall()
        return rows if len(rows) == 2 else None

    rows = eventually(booked, "both requests in the ledger")
    assert {request_id for request_id, _ in rows} == edge_ids
    assert {model for _, model in rows} == {MODEL}

    def audited() -> list[dict] | None:
        found = [entry for entry in audit_trail(stack) if entry["client_request_id"] == rid]
        return found if len(found) == 2 else None

    lines = eventually(audited, "both audit lines")
    assert {(line["request_id"], line["client_request_id"]) for line in lines} == {
        (edge_id, rid) for edge_id in edge_ids}
