"""HTTP for a simulated provider, on aiohttp's server: no HTTP parsing of our own.

aiohttp reads the requests (keep-alive, pipelining, Content-Length and chunked bodies,
Expect: 100-continue) and frames the responses (Content-Length, chunked for streams on HTTP/1.1,
close-delimited on HTTP/1.0), and answers malformed requests itself with a 4xx and a close. This
module only adapts it to what a simulated provider does: take a whole request, then answer with a
body or a stream, drop the connection with a TCP RST, or never answer.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from aiohttp import web

MAX_HEAD_FIELD_BYTES = 64 * 1024
"""Longest request line or header field accepted (Envoy forwards up to 60 KiB of headers)."""
MAX_BODY_BYTES = 64 * 1024 * 1024
SHUTDOWN_GRACE_S = 0.1
"""How long `stop` lets requests in flight finish before it cancels them: hanging requests are
part of the simulation (aiohttp reads 0 as no limit)."""

Headers = Iterable[tuple[str, str]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    method: str
    path: str
    """The target's path, without the query string."""
    query: str
    version: str
    """"HTTP/1.1" or "HTTP/1.0"."""
    headers: Mapping[str, str]
    """Lower-case names; a repeated header's values joined with ", " (RFC 9110 section 5.3)."""
    body: bytes


def _headers(request: web.BaseRequest) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


class Responder:
    """Answers one request: a body, a stream, a reset, or silence till the client leaves."""

    def __init__(self, request: web.BaseRequest) -> None:
        self._request = request
        self._response: web.StreamResponse | None = None
        self._reset = False

    @property
    def response(self) -> web.StreamResponse:
        """What aiohttp finishes: a no-op once sent; after a reset, a write that fails quietly."""
        if self._response is not None:
            return self._response
        if self._reset:
            return web.StreamResponse()
        raise RuntimeError(f"the handler neither answered nor reset {self._request.path}")

    async def send(self, status: int, body: bytes, headers: Headers = ()) -> None:
        self._response = web.Response(status=status, body=body, headers=list(headers))
        await self._response.prepare(self._request)
        await self._response.write_eof()

    async def start_stream(self, status: int, headers: Headers = ()) -> None:
        """Begin a response of unknown length: chunked on HTTP/1.1, close-delimited on HTTP/1.0."""
        self._response = web.StreamResponse(status=status, headers=list(headers))
        await self._response.prepare(self._request)

    async def write(self, data: bytes) -> None:
        if data:
            assert self._response is not None, "write before start_stream"
            await self._response.write(data)

    async def end_stream(self) -> None:
        assert self._response is not None, "end_stream before start_stream"
        await self._response.write_eof()

    def reset(self) -> None:
        """Drop the connection with a TCP RST and no response, as a crashing backend does."""
        self._reset = True
        transport = self._request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def wait_for_client_to_leave(self) -> None:
        """Never answer. The server cancels this wait when the client closes the connection
        (aiohttp's handler cancellation) or when the server stops."""
        await asyncio.get_running_loop().create_future()


Handler = Callable[[Request, Responder], Awaitable[None]]


class HttpServer:
    """aiohttp serving `handler` for every method and path; `stop` ends hanging requests too."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port); returns the bound port."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{path:.*}", self._serve)
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_GRACE_S,
            max_line_size=MAX_HEAD_FIELD_BYTES,
            max_field_size=MAX_HEAD_FIELD_BYTES,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > MAX_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(MAX_BODY_BYTES, length)
        version = f"HTTP/{request.version.major}.{request.version.minor}"
        simple = Request(
            method=request.method,
            path=request.rel_url.raw_path,
            query=request.rel_url.raw_query_string,
            version=version,
            headers=_headers(request),
            body=await request.read(),
        )
        responder = Responder(request)
        await self._handler(simple, responder)
        return responder.response

    async def stop(self) -> None:
        if self._runner is None:
            return
        await self._runner.cleanup()
        self._runner = None
