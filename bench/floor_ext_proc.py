"""The floor of the routed path: a grpc.aio ExternalProcessor that answers every request's
headers with one fixed header mutation, deciding nothing.

bench/routed_path.py puts it behind an Envoy with the same ext_proc filter settings as the edge,
over the same mutual TLS: what that pair costs per request is what any Python ext_proc on this
stack costs before it does any work, so routed/floor says how much of the routed path is ours.

    python bench/floor_ext_proc.py 127.0.0.1:PORT CA CERT KEY
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import uvloop
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2

from ext_proc.service import add_to_server
from gpu_router.grpc_tls import server_credentials
from gpu_router.pki import TlsFiles

ANSWER = ext_proc_pb2.ProcessingResponse(
    request_headers=ext_proc_pb2.HeadersResponse(
        response=ext_proc_pb2.CommonResponse(
            header_mutation=ext_proc_pb2.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="x-floor", raw_value=b"1"),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)]))))


async def process(_requests: AsyncIterator[ext_proc_pb2.ProcessingRequest],
                  context: grpc.aio.ServicerContext) -> ext_proc_pb2.ProcessingResponse:
    """As ext_proc/service.py does it: read, answer, end the stream (served stream-unary)."""
    await context.read()
    return ANSWER


async def serve(address: str, tls: TlsFiles) -> None:
    server = grpc.aio.server()
    add_to_server(process, server)
    server.add_secure_port(address, server_credentials(tls))
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1], TlsFiles(*map(Path, sys.argv[2:5]))))  # as ext_proc runs
