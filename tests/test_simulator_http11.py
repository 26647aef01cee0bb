"""The HTTP/1.1 layer over raw sockets: framing, keep-alive and protocol errors."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from simulator_fixtures import fast_spec, running_sims, stats

from simulator.http11 import HttpError, parse_head
from simulator.server import ProviderSim

MODELS_BODY_PREFIX = b'{"object":"list"'


@pytest.fixture
def sim() -> Iterator[ProviderSim]:
    with running_sims(fast_spec()) as sims:
        yield sims[0]


def exchange(port: int, *parts: bytes, pause_for: bytes = b"") -> bytes:
    """Send `parts` (waiting for `pause_for` after the first one when given); read until close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(parts[0])
        received = b""
        if pause_for:
            while pause_for not in received:
                received += sock.recv(65536)
        for part in parts[1:]:
            sock.sendall(part)
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_parse_head_joins_repeated_headers_and_lowercases_names() -> None:
    method, path, query, version, headers = parse_head(
        b"POST /v1/x?a=1 HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\nHost:  h "
    )
    assert (method, path, query, version) == ("POST", "/v1/x", "a=1", "HTTP/1.1")
    assert headers == {"x-a": "1, 2", "host": "h"}


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /\r\nhost: x", 400),
        (b"GET / HTTP/2.0", 505),
        (b"GET / HTTP/1.1\r\nno-colon", 400),
        (b"GET / HTTP/1.1\r\nhost: x\r\n folded", 400),
    ],
)
def test_parse_head_rejects(head: bytes, status: int) -> None:
    with pytest.raises(HttpError) as error:
        parse_head(head)
    assert error.value.status == status


def test_chunked_request_body(sim: ProviderSim) -> None:
    body = b'{"model":"model-b","prompt":"abcd"}'
    request = (
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
        b"connection: close\r\n\r\n"
        + b"%x\r\n%b\r\n" % (10, body[:10])
        + b"%x;ext=1\r\n%b\r\n" % (len(body) - 10, body[10:])
        + b"0\r\n\r\n"
    )
    reply = exchange(sim.port, request)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b'"text_completion"' in reply
    assert stats(sim.port)["last_request"]["body_bytes"] == len(body)


def test_expect_100_continue(sim: ProviderSim) -> None:
    body = b'{"model":"model-b","prompt":"x"}'
    head = (
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
    )
    reply = exchange(sim.port, head, body, pause_for=b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")


def test_http10_closes_after_the_response(sim: ProviderSim) -> None:
    reply = exchange(sim.port, b"GET /v1/models HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"connection: close\r\n" in reply


def test_http10_stream_is_close_delimited(sim: ProviderSim) -> None:
    body = b'{"model":"model-b","prompt":"x","stream":true,"max_tokens":1}'
    reply = exchange(
        sim.port,
        b"POST /v1/completions HTTP/1.0\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body),
    )
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head
    assert payload.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT A REQUEST\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
        (b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 99999999999\r\n\r\n", b"413"),
        (b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: -5\r\n\r\n", b"400"),
        (b"POST /v1/chat/completions HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n", b"501"),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"400",
        ),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"1" * 70_000,
            b"400",
        ),
    ],
)
def test_protocol_errors_answer_once_and_close(
    sim: ProviderSim, request_bytes: bytes, status: bytes
) -> None:
    reply = exchange(sim.port, request_bytes)
    assert reply.startswith(b"HTTP/1.1 " + status)
    assert b"connection: close\r\n" in reply
    assert reply.count(b"HTTP/1.1 ") == 1


def test_pipelined_requests_are_answered_in_order(sim: ProviderSim) -> None:
    reply = exchange(
        sim.port,
        b"GET /v1/models HTTP/1.1\r\n\r\n\r\nGET /health HTTP/1.1\r\n\r\n"
        b"GET /_sim/stats HTTP/1.1\r\nconnection: close\r\n\r\n",
    )
    bodies = [part.partition(b"\r\n\r\n")[2] for part in reply.split(b"HTTP/1.1 200 OK\r\n")[1:]]
    assert [body[:16] for body in bodies] == [
        MODELS_BODY_PREFIX,
        b'{"status":"ok"}',
        b'{"provider":"alp',
    ]
