"""The floor over HTTP/2 instead of gRPC: the same fixed answer as bench/floor_ext_proc.py, served
to Envoy's ext_proc `http_service` (Envoy 1.40, work in progress upstream: request and response
headers only, each message a POST of the ProcessingRequest as JSON, answered with the
ProcessingResponse as JSON).

The h2 library on uvloop, with the same mutual TLS (ALPN h2): one connection carries every call,
where grpc.aio spends its per-stream machinery on each. Over HTTP/1.1 Envoy 1.40 opened a new
connection (and TLS handshake) for every call, so this floor is HTTP/2 only. routed_path.py
loads it beside the gRPC floor: whether moving ext_proc to this transport would lower the floor
of the stack.

    python bench/floor_ext_proc_h2.py 127.0.0.1:PORT CA CERT KEY
"""

from __future__ import annotations

import asyncio
import ssl
import sys

import h2.config
import h2.connection
import h2.events
import uvloop
from floor_ext_proc import ANSWER
from google.protobuf import json_format

BODY = json_format.MessageToJson(ANSWER, indent=None).encode()
HEADERS = ((":status", "200"), ("content-type", "application/json"),
           ("content-length", str(len(BODY))))
CONFIG = h2.config.H2Configuration(
    client_side=False, validate_inbound_headers=False, normalize_inbound_headers=False,
    validate_outbound_headers=False, normalize_outbound_headers=False)
"""Without h2's header checks (~90 us a call here): the peer is an Envoy authenticated by mutual
TLS whose codec checked what it sends, and the answer's headers are the constants above."""


class Http2Floor(asyncio.Protocol):
    """One Envoy connection: every request stream gets ANSWER once its POST has ended."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.connection = h2.connection.H2Connection(config=CONFIG)
        self.connection.initiate_connection()
        transport.write(self.connection.data_to_send())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        connection = self.connection
        for event in connection.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                connection.send_headers(event.stream_id, HEADERS)
                connection.send_data(event.stream_id, BODY, end_stream=True)
        self.transport.write(connection.data_to_send())  # type: ignore[attr-defined]


async def serve(address: str, ca: str, cert: str, key: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED  # Envoy presents its edge certificate, as to gRPC
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    server = await asyncio.get_running_loop().create_server(Http2Floor, host, int(port),
                                                            ssl=context)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(*sys.argv[1:5]))
