"""AdminHttpServer (aiohttp) over real loopback sockets."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest

from control_plane.admin_http import AdminHttpServer
from control_plane.metrics import Metrics
from gpu_router.processes import free_port, http_get


class FakeState:
    def __init__(self) -> None:
        self.metrics = Metrics()
        self.metrics.count_reconciled("edge-1", 3)

    def health(self) -> Any:
        return {"providers": {"prov-a": {"state": "healthy"}}}

    def policy_summary(self) -> Any:
        return {"version": "abc", "providers": ["prov-a"]}

    def xds_nodes(self) -> Any:
        raise RuntimeError("xds state unavailable")

    def dashboard(self) -> Any:
        return {"providers": {}}

    def metrics_exposition(self, accept: str) -> tuple[bytes, str]:
        return self.metrics.exposition(accept)


def _request(
    port: int, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def _exercise() -> None:
    port = free_port()
    server = AdminHttpServer("127.0.0.1", port, FakeState())
    await server.start()
    try:
        status, headers, body = await asyncio.to_thread(_request, port, "GET", "/healthz")
        assert (status, body) == (200, b"ok")
        assert headers["Content-Type"] == "text/plain; charset=utf-8"
        assert await asyncio.to_thread(_two_on_one_connection, port)

        status, headers, body = await asyncio.to_thread(
            _request, port, "GET", "/v1/health?pretty=1"
        )
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body) == FakeState().health()

        assert json.loads(
            (await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/v1/policy"))[1]
        ) == {"version": "abc", "providers": ["prov-a"]}

        status, _, body = await asyncio.to_thread(_request, port, "GET", "/v1/xds")
        message = json.loads(body)["error"]["message"]
        assert status == 500 and message.startswith("/v1/xds failed (RuntimeError)")
        assert "xds state unavailable" not in message  # the text stays in the log
        assert "error_id" in message

        status, _, body = await asyncio.to_thread(_request, port, "GET", "/nope")
        error = json.loads(body)["error"]
        assert status == 404 and error["code"] == "not_found" and error["param"] is None

        status, headers, body = await asyncio.to_thread(_request, port, "POST", "/v1/health")
        assert status == 405 and headers["Allow"] == "GET"
        assert json.loads(body)["error"]["code"] == "method_not_allowed"

        status, headers, body = await asyncio.to_thread(_request, port, "GET", "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert b'gpu_router_reconciled_requests_total{node="edge-1"} 3.0' in body

        openmetrics = {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"}
        status, headers, body = await asyncio.to_thread(
            _request, port, "GET", "/metrics", openmetrics
        )
        assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        assert status == 200 and body.endswith(b"# EOF\n")

        status, headers, body = await asyncio.to_thread(_request, port, "GET", "/dashboard")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert b"<script" in body

        for garbage in (b"garbage\r\n\r\n", b"GET /healthz HTTP/1.1\r\nhost: x\r\n folded\r\n\r\n"):
            reply = await asyncio.to_thread(_raw, port, garbage)
            assert re.match(rb"HTTP/1\.[01] 400 Bad Request\r\n", reply), reply
    finally:
        await server.stop()
    assert await asyncio.to_thread(_refused, port)


def _two_on_one_connection(port: int) -> bool:
    """Keep-alive: two requests answered on one connection (a scraper reuses it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        sockets = []
        for path in ("/healthz", "/v1/policy"):
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            sockets.append(conn.sock)
        return sockets[0] is sockets[1] is not None
    finally:
        conn.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_admin_http_serves_state_over_real_sockets(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        asyncio.run(_exercise())
    unparsable = [r for r in caplog.records if r.name == "control_plane.admin_http.protocol"]
    assert unparsable == [], "answered 400, not logged with a traceback"
