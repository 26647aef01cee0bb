"""A small HTTP/1.1 server on asyncio streams: the part of RFC 9112 an OpenAI-style API needs.

Simulated providers sit behind a real Envoy and are called by the real openai SDK, so both ends
speak real HTTP/1.1: keep-alive, Content-Length and chunked request bodies, Expect: 100-continue,
chunked responses (for SSE), and Connection: close. A connection serves its requests in order;
anything it cannot parse is answered once and the connection is closed.
"""

from __future__ import annotations

import asyncio
import http
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
LINGER_S = 2.0
"""How long a connection refused with an error keeps discarding what the client still sends."""

Headers = Iterable[tuple[str, str]]


class HttpError(Exception):
    """A request this server refuses: answered with `status`, then the connection is closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
    keep_alive: bool


def _keep_alive(version: str, connection: str) -> bool:
    tokens = {token.strip().lower() for token in connection.split(",")}
    if version == "HTTP/1.1":
        return "close" not in tokens
    return "keep-alive" in tokens


def parse_head(head: bytes) -> tuple[str, str, str, str, dict[str, str]]:
    """(method, path, query, version, headers) of a request head (without its final blank line)."""
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise HttpError(400, f"malformed request line {request_line[:80]!r}")
    method, target, version = parts
    if not version.startswith("HTTP/"):
        raise HttpError(400, f"malformed request line {request_line[:80]!r}")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, f"unsupported protocol version {version[:20]!r}")
    path, _, query = target.partition("?")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or line[0] in " \t":
            raise HttpError(400, f"malformed header line {line[:80]!r}")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return method, path, query, version, headers


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError as error:
        raise HttpError(400, f"chunk framing line over {MAX_HEAD_BYTES} bytes") from error


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await _read_line(reader)
        size_text = size_line[:-2].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError as error:
            raise HttpError(400, f"bad chunk size {size_text[:20]!r}") from error
        if size == 0:
            while await _read_line(reader) != b"\r\n":
                pass  # trailer fields: not used
            return bytes(body)
        if len(body) + size > MAX_BODY_BYTES:
            raise HttpError(413, f"request body over {MAX_BODY_BYTES} bytes")
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise HttpError(400, "chunk not terminated by CRLF")


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
    encoding = headers.get("transfer-encoding")
    if encoding is not None:
        if encoding.lower() != "chunked":
            raise HttpError(501, f"unsupported transfer-encoding {encoding!r}")
        return await _read_chunked(reader)
    length_text = headers.get("content-length")
    if length_text is None:
        return b""
    if not length_text.isdigit():
        raise HttpError(400, f"bad content-length {length_text[:40]!r}")
    length = int(length_text)
    if length > MAX_BODY_BYTES:
        raise HttpError(413, f"request body of {length} bytes is over {MAX_BODY_BYTES}")
    return await reader.readexactly(length)


async def read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> Request | None:
    """The next request on a connection; None when the client closed it between requests."""
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).lstrip(b"\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial.strip(b"\r\n"):
            raise HttpError(400, "connection closed inside the request head") from error
        return None
    except asyncio.LimitOverrunError as error:
        raise HttpError(431, f"request head over {MAX_HEAD_BYTES} bytes") from error
    method, path, query, version, headers = parse_head(head[:-4])
    if "transfer-encoding" in headers and "content-length" in headers:
        # RFC 9112 section 6.3: chunked wins, and the connection must not be reused.
        headers.pop("content-length")
        headers["connection"] = "close"
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    body = await _read_body(reader, headers)
    keep_alive = _keep_alive(version, headers.get("connection", ""))
    return Request(
        method=method,
        path=path,
        query=query,
        version=version,
        headers=headers,
        body=body,
        keep_alive=keep_alive,
    )


def encode_head(status: int, headers: Headers) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Responder:
    """Answers one request: a body, a chunked stream, a reset, or silence till the client leaves."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        keep_alive: bool,
        chunked: bool,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._chunked = chunked
        self.keep_alive = keep_alive
        """False once the connection must close after this response."""
        self.finished = False
        """True once a complete response was written."""

    def _connection_headers(self) -> list[tuple[str, str]]:
        return [] if self.keep_alive else [("connection", "close")]

    async def send(self, status: int, body: bytes, headers: Headers = ()) -> None:
        head = encode_head(
            status, [*headers, ("content-length", str(len(body))), *self._connection_headers()]
        )
        self._writer.write(head + body)
        await self._writer.drain()
        self.finished = True

    async def start_stream(self, status: int, headers: Headers = ()) -> None:
        """Begin a response of unknown length: chunked on HTTP/1.1, close-delimited on HTTP/1.0."""
        if not self._chunked:
            self.keep_alive = False
        framing = [("transfer-encoding", "chunked")] if self._chunked else []
        self._writer.write(encode_head(status, [*headers, *framing, *self._connection_headers()]))
        await self._writer.drain()

    async def write(self, data: bytes) -> None:
        if not data:
            return
        if self._chunked:
            self._writer.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._writer.write(data)
        await self._writer.drain()

    async def end_stream(self) -> None:
        if self._chunked:
            self._writer.write(b"0\r\n\r\n")
            await self._writer.drain()
        self.finished = True

    def reset(self) -> None:
        """Drop the connection with a TCP RST and no response, as a crashing backend does."""
        self.keep_alive = False
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._writer.transport.abort()

    async def wait_for_client_to_leave(self) -> None:
        """Never answer; return once the client closes its side (anything it sends is discarded)."""
        self.keep_alive = False
        while await self._reader.read(65536):
            pass


Handler = Callable[[Request, Responder], Awaitable[None]]


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then discard what the client still sends for a while.

    Closing a socket with unread input sends a TCP RST, which can destroy the error response
    before the client reads it.
    """
    if writer.can_write_eof():
        writer.write_eof()
    try:
        async with asyncio.timeout(LINGER_S):
            while await reader.read(65536):
                pass
    except TimeoutError:
        pass


async def serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler
) -> None:
    """Serve requests on one connection until either side closes it."""
    try:
        while True:
            try:
                request = await read_request(reader, writer)
            except HttpError as error:
                responder = Responder(reader, writer, keep_alive=False, chunked=True)
                body = f"{error.status} {error.message}\n".encode()
                await responder.send(error.status, body, [("content-type", "text/plain")])
                await _linger(reader, writer)
                return
            if request is None:
                return
            responder = Responder(
                reader, writer, keep_alive=request.keep_alive, chunked=request.version == "HTTP/1.1"
            )
            await handler(request, responder)
            if not (responder.finished and responder.keep_alive):
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


class HttpServer:
    """A listening socket whose connections are all ended by `stop`, hanging ones included."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port); returns the bound port."""
        self._server = await asyncio.start_server(
            self._on_connection, host, port, limit=MAX_HEAD_BYTES, reuse_address=True
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await serve_connection(reader, writer, self._handler)
        finally:
            self._connections.discard(task)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
