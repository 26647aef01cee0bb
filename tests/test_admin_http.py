"""AdminHttpServer over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from typing import Any

from control_plane.admin_http import AdminHttpServer
from gpu_router.processes import free_port, http_get


class FakeState:
    def health(self) -> Any:
        return {"providers": {"prov-a": {"state": "healthy"}}}

    def policy_summary(self) -> Any:
        return {"version": "abc", "providers": ["prov-a"]}

    def xds_nodes(self) -> Any:
        raise RuntimeError("xds state unavailable")

    def dashboard(self) -> Any:
        return {"providers": {}}

    def metrics_text(self) -> str:
        return "# TYPE gpu_router_requests_total counter\ngpu_router_requests_total 3\n"


def _request(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
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
        assert headers["Connection"] == "close"

        status, headers, body = await asyncio.to_thread(
            _request, port, "GET", "/v1/health?pretty=1"
        )
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body) == FakeState().health()

        assert json.loads(
            (await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/v1/policy"))[1]
        ) == {"version": "abc", "providers": ["prov-a"]}

        status, _, body = await asyncio.to_thread(_request, port, "GET", "/v1/xds")
        assert status == 500
        assert "xds state unavailable" in json.loads(body)["error"]["message"]

        status, _, body = await asyncio.to_thread(_request, port, "GET", "/nope")
        error = json.loads(body)["error"]
        assert status == 404 and error["code"] == "not_found" and error["param"] is None

        status, headers, body = await asyncio.to_thread(_request, port, "POST", "/v1/health")
        assert status == 405 and headers["Allow"] == "GET"
        assert json.loads(body)["error"]["code"] == "method_not_allowed"

        status, headers, body = await asyncio.to_thread(_request, port, "GET", "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert b"gpu_router_requests_total 3" in body

        status, headers, body = await asyncio.to_thread(_request, port, "GET", "/dashboard")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert b"<script" in body

        reply = await asyncio.to_thread(_raw, port, b"garbage\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    finally:
        await server.stop()
    assert await asyncio.to_thread(_refused, port)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_admin_http_serves_state_over_real_sockets() -> None:
    asyncio.run(_exercise())
