"""A simulated provider's HTTP over raw sockets: framing, keep-alive, resets and malformed input.

aiohttp parses; these tests pin down what the simulation relies on from it.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest
from simulator_fixtures import fast_spec, running_sims, set_fault, stats

from simulator.server import ProviderSim
from simulator.transport import MAX_BODY_BYTES

MODELS_BODY_PREFIX = b'{"object":"list"'
CHAT = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"


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


def one_response(port: int, request: bytes) -> bytes:
    """Send `request`, read one Content-Length framed response, leave the connection open."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head, _, body = received.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        assert length, head
        while len(body) < int(length.group(1)):
            body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


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


def test_http10_is_answered_then_closed(sim: ProviderSim) -> None:
    reply = exchange(sim.port, b"GET /v1/models HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 200 OK\r\n")
    assert reply.partition(b"\r\n\r\n")[2].startswith(MODELS_BODY_PREFIX)


def test_http10_stream_is_close_delimited(sim: ProviderSim) -> None:
    body = b'{"model":"model-b","prompt":"x","stream":true,"max_tokens":1}'
    reply = exchange(
        sim.port,
        b"POST /v1/completions HTTP/1.0\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body),
    )
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert payload.startswith(b"data: {") and payload.endswith(b"data: [DONE]\n\n")


def test_repeated_headers_reach_the_handler_joined_with_lower_case_names(sim: ProviderSim) -> None:
    exchange(
        sim.port,
        b"GET /v1/models?a=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\nconnection: close\r\n\r\n",
    )
    last = stats(sim.port)["last_request"]
    assert last["path"] == "/v1/models"
    assert last["headers"]["x-a"] == "1, 2" and last["headers"]["host"] == "x"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"NOT A REQUEST\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n folded\r\n\r\n",
        CHAT + b"content-length: -5\r\n\r\n",
        CHAT + b"transfer-encoding: gzip\r\n\r\n",
        CHAT + b"transfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n",
        CHAT + b"transfer-encoding: chunked\r\n\r\nzz\r\n",
        CHAT + b"transfer-encoding: chunked\r\n\r\n" + b"1" * 70_000,
    ],
)
def test_malformed_requests_get_one_400_then_a_close(
    sim: ProviderSim, request_bytes: bytes
) -> None:
    reply = exchange(sim.port, request_bytes)
    assert re.match(rb"HTTP/1\.[01] 400 Bad Request\r\n", reply), reply[:200]
    assert stats(sim.port)["requests"] == 0, "the provider's handler never saw it"


def test_headers_up_to_envoys_60_kib_limit_are_accepted(sim: ProviderSim) -> None:
    reply = exchange(
        sim.port,
        b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: "
        + b"a" * 60 * 1024
        + b"\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_body_over_the_limit_is_413_before_it_is_sent(sim: ProviderSim) -> None:
    reply = one_response(sim.port, CHAT + b"content-length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1))
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert stats(sim.port)["requests"] == 0


def test_pipelined_requests_are_answered_in_order(sim: ProviderSim) -> None:
    reply = exchange(
        sim.port,
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\nGET /health HTTP/1.1\r\nhost: x\r\n\r\n"
        b"GET /_sim/stats HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    bodies = [part.partition(b"\r\n\r\n")[2] for part in reply.split(b"HTTP/1.1 200 OK\r\n")[1:]]
    assert [body[:16] for body in bodies] == [
        MODELS_BODY_PREFIX,
        b'{"status":"ok"}',
        b'{"provider":"alp',
    ]


def test_reset_fault_is_a_tcp_rst_with_no_response(sim: ProviderSim) -> None:
    set_fault(sim.port, mode="reset")
    body = b'{"model":"model-b","prompt":"x"}'
    with socket.create_connection(("127.0.0.1", sim.port), timeout=5) as sock:
        sock.sendall(CHAT + b"content-length: %d\r\n\r\n%b" % (len(body), body))
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass
    assert stats(sim.port)["faults"]["hit"] == 1
