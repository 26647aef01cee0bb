"""Non-UTF-8 bytes from a client, through the whole stack, cost no ledger row.

Measured on Envoy 1.40: the access-log fields Envoy fills from headers (user agent, path,
logged headers) have invalid bytes replaced with "!"; dynamic metadata is sent as filters set
it, and the edge's Lua now answers 400 to a body or model header that is not UTF-8 before
anything of it reaches metadata. Should invalid bytes reach a string field anyway, the
control plane parses the message leniently (test_telemetry_als_utf8.py shows that with a
real Envoy); here every request of the burst, odd bytes or not, is booked once.
"""

from __future__ import annotations

import http.client
import json
import sqlite3
import threading
import urllib.parse

from polling import eventually

from gpu_router.stack import Stack


def body(model: bytes) -> bytes:
    return (b'{"model": "' + model + b'", "max_tokens": 8, '
            b'"messages": [{"role": "user", "content": "hi"}]}')


def send(stack: Stack, request_id: str, payload: bytes, headers: dict[str, bytes]) -> int:
    """POST raw bytes, headers included (http.client sends bytes values as they are)."""
    url = urllib.parse.urlsplit(stack.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        connection.putrequest("POST", "/v1/chat/completions")
        for name, value in {"content-type": b"application/json", "x-request-id":
                            request_id.encode(), **headers}.items():
            connection.putheader(name, value)
        connection.putheader("content-length", str(len(payload)))
        connection.endheaders(payload)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def booked(stack: Stack) -> list[str]:
    """The client's request ids in the ledger, one per row."""
    connection = sqlite3.connect(stack.log_dir / "ledger.db")
    try:
        return [row[0] for row in connection.execute("select client_request_id from requests")]
    finally:
        connection.close()


def test_non_utf8_header_and_body_bytes_are_booked_with_their_burst(stack: Stack) -> None:
    good = body(b"llama-3.1-8b")
    requests = {
        "utf8-before": (good, {}),
        "utf8-user-agent": (good, {"user-agent": b"\xff\xfe"}),
        "utf8-body-model": (body(b"llama-3.1-8b\xff"), {}),
        "utf8-model-header": (good, {"x-gpu-router-model": b"llama-3.1-8b\xff"}),
        "utf8-other-header": (good, {"x-client-note": b"caf\xe9"}),
        "utf8-after": (good, {}),
    }
    statuses: dict[str, int] = {}

    def run(request_id: str) -> None:
        payload, headers = requests[request_id]
        statuses[request_id] = send(stack, request_id, payload, headers)

    threads = [threading.Thread(target=run, args=(request_id,)) for request_id in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert statuses == {"utf8-before": 200, "utf8-user-agent": 200, "utf8-body-model": 400,
                        "utf8-model-header": 400, "utf8-other-header": 200, "utf8-after": 200}
    eventually(lambda: set(booked(stack)) >= set(requests), "every request in the ledger")
    assert sorted(i for i in booked(stack) if i in requests) == sorted(requests)
    _, metrics = stack.control_get("/metrics")
    assert b'gpu_router_telemetry_dropped_total{kind="edge"' not in metrics
    log = (stack.log_dir / "control-plane.log").read_text()
    assert "DecodeError" not in log, "an access-log message failed to parse"
    assert not [line for line in log.splitlines()
                if json.loads(line).get("level") == "error" and "AccessLog" in line]
