"""The load generator the fault tests rely on can fail: a stub server that answers some requests
with a plain-text 503, resets or never answers, and Traffic counts each of them."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from polling import eventually
from stack_harness import Traffic, TrafficClientDied

ENVOY_503 = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"


class FaultyServer(ThreadingHTTPServer):
    """Request n (from 1) gets: a plain-text 503 when n % 5 == 0, a TCP reset when n % 10 == 3,
    no answer when n % 10 == 7, else a JSON 200 naming provider "stub"."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FaultyHandler)
        self.lock = threading.Lock()
        self.requests = 0
        self.served: Counter[str] = Counter()
        self.release = threading.Event()

    def next_fate(self) -> str:
        with self.lock:
            self.requests += 1
            n = self.requests
            fate = "503" if n % 5 == 0 else "reset" if n % 10 == 3 else "hang" if n % 10 == 7 else "200"
            self.served[fate] += 1
            return fate


class FaultyHandler(BaseHTTPRequestHandler):
    server: FaultyServer

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        fate = self.server.next_fate()
        if fate == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if fate == "hang":
            self.server.release.wait(timeout=30)
            self.close_connection = True
            return
        status, kind, body = ((503, "text/plain", ENVOY_503) if fate == "503" else
                              (200, "application/json", json.dumps({"choices": []}).encode()))
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        if status == 200:
            self.send_header("x-gpu-router-provider", "stub")
            self.send_header("x-gpu-router-reason", "cost")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass(frozen=True)
class Stub:
    url: str


@pytest.fixture
def faulty() -> Iterator[FaultyServer]:
    server = FaultyServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_traffic_counts_plain_text_errors_resets_and_timeouts_without_losing_clients(
    faulty: FaultyServer,
) -> None:
    edge = Stub(f"http://127.0.0.1:{faulty.server_address[1]}")
    with Traffic([edge, edge], "m", {"x-workload": "batch"}, threads=4, timeout=0.5) as traffic:
        eventually(lambda: traffic.total() >= 60 and faulty.served["hang"] >= 2, "60 requests")
        assert all(thread.is_alive() for thread in traffic.threads)

    served = faulty.served
    assert traffic.failures() == {(503, ""): served["503"], ("reset", ""): served["reset"],
                                  ("timeout", ""): served["hang"]}
    assert traffic.count("stub") == served["200"] == traffic.outcomes[(200, "stub")]
    assert traffic.total() == faulty.requests
    text = next(e for e in traffic.failed if e.status == 503)
    assert text.body == ENVOY_503.decode()
    assert {e.reason for e in traffic.exchanges if e.ok} == {"cost"}
    assert all(e.latency_s > 0 for e in traffic.exchanges)


def test_a_client_that_dies_of_a_bug_fails_the_test() -> None:
    traffic = Traffic(Stub("nope://127.0.0.1"), "m", {}, threads=2)
    with pytest.raises(TrafficClientDied, match="unknown url type"), traffic:
        eventually(lambda: len(traffic.crashes) == 2, "both clients to die")
        with pytest.raises(TrafficClientDied):
            traffic.failures()
