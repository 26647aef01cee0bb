"""The control plane's small HTTP admin surface (stdlib asyncio, one request per connection).

GET /healthz      -> 200 "ok"
GET /v1/health    -> fleet health (state.health())
GET /v1/policy    -> the policy being served (state.policy_summary())
GET /v1/xds       -> connected xDS nodes and what they ACKed (state.xds_nodes())
GET /v1/dashboard -> the dashboard's data (state.dashboard())
GET /metrics      -> Prometheus text exposition (state.metrics_text())
GET /dashboard    -> the dashboard page and its assets (no CDN: works offline)

Errors are JSON in the same shape the edge gives clients:
{"error": {"message": ..., "type": ..., "param": null, "code": ...}}.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Protocol

from control_plane.dashboard.data import DATA_PATH, dashboard_files
from control_plane.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

logger = logging.getLogger(__name__)

_REQUEST_HEAD_LIMIT = 16 * 1024
_READ_TIMEOUT_S = 5.0


class AdminState(Protocol):
    """What the admin surface shows; each method returns a JSON-serialisable value."""

    def health(self) -> Any: ...

    def policy_summary(self) -> Any: ...

    def xds_nodes(self) -> Any: ...

    def dashboard(self) -> Any: ...

    def metrics_text(self) -> str: ...


class MalformedRequestError(ValueError):
    """The bytes received are not an HTTP/1.x request head we can answer."""


JSON = "application/json"

Route = tuple[str, Callable[[], bytes]]
"""(content type, producer of the body)."""


def _as_json(producer: Callable[[], Any]) -> Callable[[], bytes]:
    return lambda: json.dumps(producer(), indent=2, sort_keys=True).encode()


def routes(state: AdminState) -> dict[str, Route]:
    """Every path the admin surface answers, built once per server."""
    table: dict[str, Route] = {
        "/healthz": ("text/plain; charset=utf-8", lambda: b"ok"),
        "/v1/health": (JSON, _as_json(state.health)),
        "/v1/policy": (JSON, _as_json(state.policy_summary)),
        "/v1/xds": (JSON, _as_json(state.xds_nodes)),
        DATA_PATH: (JSON, _as_json(state.dashboard)),
        "/metrics": (METRICS_CONTENT_TYPE, lambda: state.metrics_text().encode()),
    }
    for path, (content_type, content) in dashboard_files().items():
        table[path] = (content_type, lambda content=content: content)
    return table


def _error_body(status: HTTPStatus, message: str) -> bytes:
    error = {
        "message": message,
        "type": "admin_error",
        "param": None,
        "code": status.phrase.lower().replace(" ", "_"),
    }
    return json.dumps({"error": error}).encode()


def _response(
    status: HTTPStatus, body: bytes, content_type: str, extra: tuple[str, ...] = ()
) -> bytes:
    head = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def parse_request_line(head: bytes) -> tuple[str, str]:
    """(method, path without query) from a request head; raises MalformedRequestError."""
    try:
        line = head.split(b"\r\n", 1)[0].decode("ascii")
        method, target, version = line.split(" ")
    except (UnicodeDecodeError, ValueError) as error:
        raise MalformedRequestError(f"malformed request line: {head[:80]!r}") from error
    if not version.startswith("HTTP/1."):
        raise MalformedRequestError(f"unsupported protocol {version!r}")
    return method, target.split("?", 1)[0]


def respond(table: dict[str, Route], method: str, path: str) -> bytes:
    """The full HTTP response to one request; pure apart from calling the route's producer."""
    route = table.get(path)
    if route is None:
        return _response(
            HTTPStatus.NOT_FOUND,
            _error_body(HTTPStatus.NOT_FOUND, f"no such path: {path}"),
            "application/json",
        )
    if method != "GET":
        return _response(
            HTTPStatus.METHOD_NOT_ALLOWED,
            _error_body(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} not allowed, use GET"),
            "application/json",
            ("Allow: GET",),
        )
    content_type, producer = route
    try:
        body = producer()
    except Exception as error:
        # A bug behind one endpoint must not take the admin surface down; say what broke.
        logger.exception("admin endpoint failed", extra={"path": path})
        return _response(
            HTTPStatus.INTERNAL_SERVER_ERROR,
            _error_body(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"{path}: {type(error).__name__}: {error}"
            ),
            "application/json",
        )
    return _response(HTTPStatus.OK, body, content_type)


class AdminHttpServer:
    """Serves `respond` over HTTP/1.1; port 0 picks a free one (read `.port` after start)."""

    def __init__(self, host: str, port: int, state: AdminState) -> None:
        self.host = host
        self.port = port
        self._routes = routes(state)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=_REQUEST_HEAD_LIMIT
        )
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("admin http listening", extra={"host": self.host, "port": self.port})

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
                method, path = parse_request_line(head)
                response = respond(self._routes, method, path)
            except (
                MalformedRequestError,
                asyncio.LimitOverrunError,
                asyncio.IncompleteReadError,
            ) as error:
                response = _response(
                    HTTPStatus.BAD_REQUEST,
                    _error_body(HTTPStatus.BAD_REQUEST, str(error)),
                    "application/json",
                )
            except TimeoutError:
                return
            writer.write(response)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
