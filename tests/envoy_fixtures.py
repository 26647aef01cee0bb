"""Pieces that component tests running the real Envoy share: static clusters for hand-built
bootstraps, the Envoy command line, gRPC servers and an ALS collector for translated ones."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from ext_proc_fixtures import test_certs
from google.protobuf import empty_pb2

from gpu_router.grpc_tls import server_credentials
from gpu_router.processes import envoy_binary

TYPE_PREFIX = "type.googleapis.com/"


def static_cluster(
    name: str, port: int, *, http2: bool = False, connect_timeout: str = "1s",
    buffer_limit: int | None = None,
) -> dict[str, Any]:
    """A STATIC cluster of one 127.0.0.1 endpoint; HTTP/2 for gRPC services."""
    endpoint = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                            "port_value": port}}}}
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
    }
    if buffer_limit is not None:
        cluster["per_connection_buffer_limit_bytes"] = buffer_limit
    if http2:
        options = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        cluster["typed_extension_protocol_options"] = {
            options: {"@type": TYPE_PREFIX + options,
                      "explicit_http_config": {"http2_protocol_options": {}}},
        }
    return cluster


def envoy_argv(config: Path, *extra: str) -> list[str]:
    return [envoy_binary(), "-c", str(config), "--disable-hot-restart", "-l", "info", *extra]


def grpc_server(port: int) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_insecure_port(f"127.0.0.1:{port}")
    return server


def ext_proc_grpc_server(port: int) -> grpc.Server:
    """A stand-in ext_proc's server: mutual TLS with the test fleet's ext_proc certificate, as
    the translated ext_proc cluster requires (ext_proc/workers.py serves the same way)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_secure_port(f"127.0.0.1:{port}",
                           server_credentials(test_certs()["ext-proc-test"]))
    return server


class AccessLogCollector(als_pb2_grpc.AccessLogServiceServicer):
    """The control plane's ALS endpoint, reduced to keeping (log name, entry) pairs."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, als_pb2.StreamAccessLogsMessage]] = []

    def StreamAccessLogs(
        self,
        request_iterator: Iterable[als_pb2.StreamAccessLogsMessage],
        context: grpc.ServicerContext,
    ) -> empty_pb2.Empty:
        log_name = ""
        for message in request_iterator:
            log_name = message.identifier.log_name or log_name
            self.entries.extend((log_name, entry) for entry in message.http_logs.log_entry)
        return empty_pb2.Empty()
