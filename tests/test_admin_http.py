"""AdminHttpServer (aiohttp) over real loopback sockets."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import logging
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from control_plane.admin_http import AdminHttpServer, authorized
from control_plane.metrics import Metrics
from control_plane.options import Options
from gpu_router.admin_token import ADMIN_TOKEN_FILE, bearer, read_admin_token
from gpu_router.processes import free_port, http_get
from gpu_router.secret_files import SecretFileError

TOKEN = "the-operators-token-0123456789"
AUTH = bearer(TOKEN)


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
    """With the admin token unless `headers` says otherwise."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, headers={**AUTH, **(headers or {})}
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
    server = AdminHttpServer("127.0.0.1", port, FakeState(), TOKEN)
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
            (await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/v1/policy", 2.0,
                                     None, AUTH))[1]
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
            conn.request("GET", path, headers=AUTH)
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


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize(("headers", "admitted"), [
    ({"Authorization": ""}, False),
    (bearer("not-the-token-0123456789"), False),
    (bearer(TOKEN), True),
    ({"Authorization": f"bearer  {TOKEN} "}, True),
    (basic("", TOKEN), True),  # curl -u :TOKEN
    (basic("operator", TOKEN), True),  # what a browser sends once asked
    (basic(TOKEN, ""), False),
    ({"Authorization": f"Basic {TOKEN}"}, False),  # not base64 of user:password
    ({"Authorization": f"Token {TOKEN}"}, False),
])
def test_the_admin_api_answers_the_operators_token_only(
    headers: dict[str, str], admitted: bool,
) -> None:
    """Per-client spend and every request's story are for the operator: every path but
    /healthz asks for the token, and one without it learns nothing, not even which paths
    exist; the browser is asked for it (Basic), so the dashboard works."""
    assert authorized(headers["Authorization"], TOKEN) is admitted

    async def exercise() -> list[tuple[int, dict[str, str], bytes]]:
        port = free_port()
        server = AdminHttpServer("127.0.0.1", port, FakeState(), TOKEN)
        await server.start()
        try:
            return [await asyncio.to_thread(_request, port, "GET", path, headers)
                    for path in ("/v1/policy", "/nope", "/healthz")]
        finally:
            await server.stop()

    policy, nope, healthz = asyncio.run(exercise())
    assert healthz[0] == 200
    if admitted:
        assert (policy[0], nope[0]) == (200, 404)
    else:
        assert (policy[0], nope[0]) == (401, 401)
        assert policy[1]["WWW-Authenticate"] == 'Basic realm="gpu-router"'
        assert json.loads(policy[2])["error"]["code"] == "unauthorized"


def test_the_token_is_made_once_private_and_a_bad_one_is_an_error_naming_its_file(
    tmp_path: Path,
) -> None:
    """The control plane makes it on first start and keeps it; `gpu-router health` reads it."""
    options = Options(policy=None, certs_dir=tmp_path / "certs")
    token = options.admin_token()
    path = tmp_path / "certs" / ADMIN_TOKEN_FILE
    assert path.stat().st_mode & 0o777 == 0o600 and options.admin_token() == token
    assert read_admin_token(path) == token
    path.write_text("short\n")
    with pytest.raises(SecretFileError, match=f"{path}: the admin token must be 16 to 256"):
        options.admin_token()
    with pytest.raises(SecretFileError, match="cannot read the admin token"):
        read_admin_token(tmp_path / "nowhere")


def test_an_authorization_header_of_any_bytes_is_answered_not_a_failure() -> None:
    """Whoever reaches the port may send any bytes: they get 401, not a 500 and a traceback in
    the log; a user name that is not UTF-8 does not matter beside the right token."""
    latin_1_user = base64.b64encode(b"op\xe9rator:" + TOKEN.encode())

    async def exercise() -> list[bytes]:
        port = free_port()
        server = AdminHttpServer("127.0.0.1", port, FakeState(), TOKEN)
        await server.start()
        try:
            return [await asyncio.to_thread(
                _raw, port, b"GET /v1/policy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Authorization: " + value + b"\r\n\r\n")
                for value in (b"Basic \xe9", b"Bearer \xe9", b"Basic " + latin_1_user)]
        finally:
            await server.stop()

    replies = asyncio.run(exercise())
    assert [reply.split(b" ", 2)[1] for reply in replies] == [b"401", b"401", b"200"], replies
