"""The control plane's small HTTP admin surface, served by aiohttp (no HTTP parsing of our own).

GET /healthz      -> 200 "ok"
GET /v1/health    -> fleet health (state.health())
GET /v1/policy    -> the policy being served (state.policy_summary())
GET /v1/xds       -> connected xDS nodes and what they ACKed (state.xds_nodes())
GET /v1/dashboard -> the dashboard's data (state.dashboard())
GET /v1/why/<id>  -> one request's routing story from the ledger (state.why(id); 404 if unknown)
GET /metrics      -> Prometheus exposition: text 0.0.4, or OpenMetrics when the scraper's Accept
                     asks for it (state.metrics_exposition(accept))
GET /dashboard    -> the dashboard page and its assets (no CDN: works offline)

Every path but /healthz (liveness: it tells nothing) answers only a request carrying the
operator's admin token (the control plane's --admin-token-file), as `Authorization: Bearer
<token>` or Basic with the token as the password (what a browser asks for on the dashboard, and
`curl -u :TOKEN`); anything else gets 401. The API shows per-client spend and every request's
story: nothing of it is for whoever merely reaches the port.

Errors are JSON in the same shape the edge gives clients:
{"error": {"message": ..., "type": ..., "param": null, "code": ...}}.
Requests aiohttp cannot parse are answered 400 by aiohttp itself.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import ssl
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from control_plane.dashboard.data import DATA_PATH, dashboard_files
from control_plane.edge_certificate import EdgeCertificateError, read_listener_certificate

logger = logging.getLogger(__name__)

_IDLE_TIMEOUT_S = 5.0
"""A connection without a complete request for this long is closed (a request head that never
ends included): aiohttp's keep-alive timeout, which also runs from the connection's start."""
_SHUTDOWN_GRACE_S = 1.0
"""How long `stop` lets requests in flight finish (aiohttp reads 0 as no limit)."""


class AdminState(Protocol):
    """What the admin surface shows; each method returns a JSON-serialisable value."""

    def health(self) -> Any: ...

    def policy_summary(self) -> Any: ...

    def xds_nodes(self) -> Any: ...

    def dashboard(self) -> Any: ...

    def metrics_exposition(self, accept: str) -> tuple[bytes, str]:
        """(body, content type) for a scrape with this Accept header."""
        ...

    def why(self, request_id: str) -> Any:
        """One request's story; LookupError when the ledger has no such request."""
        ...


WHY_PREFIX = "/v1/why/"


class _DropUnparsableRequests(logging.Filter):
    """aiohttp logs each request it cannot parse at ERROR with a traceback; on a port anyone
    can reach that is a way to flood the log. The client got its 400: drop the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


_protocol_logger = logging.getLogger(f"{__name__}.protocol")
_protocol_logger.addFilter(_DropUnparsableRequests())

JSON = "application/json"

Route = Callable[[str], tuple[bytes, str]]
"""The request's Accept header -> (body, content type)."""


def _as_json(producer: Callable[[], Any]) -> Route:
    return lambda _accept: (json.dumps(producer(), indent=2, sort_keys=True).encode(), JSON)


OPEN_PATHS = frozenset({"/healthz"})
"""Answered without the token: container healthchecks probe it, and it tells nothing."""


def authorized(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries the admin token: `Bearer <token>`, or Basic
    with the token as the password (any user name)."""
    # As bytes: aiohttp hands any other byte on as a surrogate, which encode() would not take.
    raw = (header or "").encode("utf-8", "surrogateescape")
    scheme, _, value = raw.strip().partition(b" ")
    if scheme.lower() == b"bearer":
        given = value.strip()
    elif scheme.lower() == b"basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
        except ValueError:  # binascii.Error, and non-ASCII input
            return False
    else:
        return False
    return secrets.compare_digest(given, token.encode())


def _fixed(body: bytes, content_type: str) -> Route:
    return lambda _accept: (body, content_type)


def routes(state: AdminState) -> dict[str, Route]:
    """Every path the admin surface answers, built once per server."""
    table: dict[str, Route] = {
        "/healthz": _fixed(b"ok", "text/plain; charset=utf-8"),
        "/v1/health": _as_json(state.health),
        "/v1/policy": _as_json(state.policy_summary),
        "/v1/xds": _as_json(state.xds_nodes),
        DATA_PATH: _as_json(state.dashboard),
        "/metrics": state.metrics_exposition,
    }
    for path, (content_type, content) in dashboard_files().items():
        table[path] = _fixed(content, content_type)
    return table


def _error(status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> web.Response:
    error = {
        "message": message,
        "type": "admin_error",
        "param": None,
        "code": status.phrase.lower().replace(" ", "_"),
    }
    return web.Response(
        status=status.value,
        body=json.dumps({"error": error}).encode(),
        headers={"Content-Type": JSON, **(headers or {})},
    )


def _why_route(state: AdminState, request_id: str) -> Route:
    def route(_accept: str) -> tuple[bytes, str]:
        try:
            story = state.why(request_id)
        except LookupError as error:
            raise _NotFoundError(str(error)) from error
        return json.dumps(story, indent=2).encode(), JSON
    return route


class _NotFoundError(LookupError):
    """A producer's way to answer 404 with a message."""


def respond(table: dict[str, Route], method: str, path: str, accept: str,
            state: AdminState | None = None) -> web.Response:
    """The response to one request; pure apart from calling the route's producer."""
    route = table.get(path)
    if route is None and state is not None and path.startswith(WHY_PREFIX):
        route = _why_route(state, path[len(WHY_PREFIX):])
    if route is None:
        return _error(HTTPStatus.NOT_FOUND, f"no such path: {path}")
    if method != "GET":
        return _error(
            HTTPStatus.METHOD_NOT_ALLOWED, f"{method} not allowed, use GET", {"Allow": "GET"}
        )
    try:
        body, content_type = route(accept)
    except _NotFoundError as error:
        return _error(HTTPStatus.NOT_FOUND, str(error))
    except Exception as error:
        # A bug behind one endpoint must not take the admin surface down. The exception's text
        # may hold paths or data the caller should not see: it goes to the log under an id the
        # answer names.
        error_id = secrets.token_hex(6)
        logger.exception("admin endpoint failed", extra={"path": path, "error_id": error_id})
        return _error(
            HTTPStatus.INTERNAL_SERVER_ERROR,
            f"{path} failed ({type(error).__name__}); the control plane's log has it as "
            f"error_id {error_id}",
        )
    return web.Response(body=body, headers={"Content-Type": content_type})


class AdminTlsError(Exception):
    """The admin API's certificate or key cannot be served; says which file and why."""


class AdminTls:
    """The admin API's TLS: 1.2 or later with the pair in `cert` and `key`, checked as the edge
    listener's is (AdminTlsError naming the file). The listener keeps `context`, whose SNI
    callback hands every handshake the pair served now, so a renewed pair (`serve(read())`, the
    control plane's watcher) is served from the next connection on without reopening the port;
    connections already open keep theirs."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self._served = self.context = self.read()
        self.context.sni_callback = self._hand_over

    def read(self) -> ssl.SSLContext:
        """A context of the pair as the files hold it now."""
        try:
            read_listener_certificate(self.cert, self.key)
        except EdgeCertificateError as error:
            raise AdminTlsError(f"--http-tls-cert, --http-tls-key: {error}") from None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as error:  # a file replaced since it was checked
            raise AdminTlsError(f"--http-tls-cert {self.cert}, --http-tls-key {self.key}: "
                                f"{error}") from None
        return context

    def serve(self, context: ssl.SSLContext) -> None:
        self._served = context

    def _hand_over(self, connection: ssl.SSLObject, _server_name: str | None,
                   _context: ssl.SSLContext) -> None:
        if connection.context is not self._served:
            connection.context = self._served


class AdminHttpServer:
    """Serves `respond` with aiohttp; port 0 picks a free one (read `.port` after start)."""

    def __init__(self, host: str, port: int, state: AdminState, token: str,
                 tls: ssl.SSLContext | None = None) -> None:
        """`token`: the admin token every path but OPEN_PATHS asks for; `tls`: serve HTTPS
        only (AdminTls.context)."""
        self.host = host
        self.port = port
        self._tls = tls
        self._routes = routes(state)
        self._state = state
        self._token = token
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._serve)
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            logger=_protocol_logger,
            keepalive_timeout=_IDLE_TIMEOUT_S,
            shutdown_timeout=_SHUTDOWN_GRACE_S,
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=self._tls).start()
        self.port = int(self._runner.addresses[0][1])
        logger.info("admin http listening",
                    extra={"host": self.host, "port": self.port, "tls": self._tls is not None})

    async def stop(self) -> None:
        if self._runner is None:
            return
        await self._runner.cleanup()
        self._runner = None

    async def _serve(self, request: web.Request) -> web.Response:
        if request.path not in OPEN_PATHS and not authorized(
                request.headers.get("Authorization"), self._token):
            return _error(HTTPStatus.UNAUTHORIZED, "the admin API needs the control plane's "
                          "admin token: Authorization: Bearer <token>, or Basic with it as the "
                          "password", {"WWW-Authenticate": 'Basic realm="gpu-router"'})
        args = (self._routes, request.method, request.path, request.headers.get("Accept", ""),
                self._state)
        if request.path.startswith(WHY_PREFIX):
            # The ledger finds a request by its id alone by reading its key (store.py): 0.1-0.2 s
            # for an unknown id at 1.6 million rows, which must not stall the event loop's xDS and
            # access log.
            return await asyncio.to_thread(respond, *args)
        return respond(*args)
