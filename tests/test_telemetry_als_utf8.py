"""A real Envoy sends a string field of invalid UTF-8 over ALS; no entry of its batch is lost.

Envoy replaces invalid bytes in the access-log fields it fills from headers, but sends dynamic
metadata as a filter set it. Here a Lua filter copies a client header's raw bytes into the
"gpu_router.request" metadata (as the edge's request-fields Lua once copied the body's model),
so the edge log's message carries bytes Python protobuf refuses in any message.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from pathlib import Path
from typing import Any

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy_fixtures import static_cluster
from telemetry_fixtures import edge_named, eventually

from control_plane.telemetry.als import EDGE_LOG_NAME, AccessLogReceiver
from control_plane.telemetry.health import FleetHealth
from gpu_router.processes import EnvoyAdmin, ManagedProcess, envoy_binary, free_port

TYPE_PREFIX = "type.googleapis.com/"
COPY_HEADER = """
function envoy_on_request(handle)
  local note = handle:headers():get("x-note") or ""
  handle:streamInfo():dynamicMetadata():set("gpu_router.request", "note", note)
end
"""


def bootstrap(admin_port: int, listen_port: int, als_port: int) -> dict[str, Any]:
    lua = {"name": "envoy.filters.http.lua", "typed_config": {
        "@type": TYPE_PREFIX + "envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": COPY_HEADER}}}
    router = {"name": "envoy.filters.http.router", "typed_config": {
        "@type": TYPE_PREFIX + "envoy.extensions.filters.http.router.v3.Router"}}
    als = {"name": "envoy.access_loggers.http_grpc", "typed_config": {
        "@type": TYPE_PREFIX + "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
        "common_config": {
            "log_name": EDGE_LOG_NAME, "transport_api_version": "V3",
            "buffer_flush_interval": "1s",  # the whole burst in one message
            "grpc_service": {"envoy_grpc": {"cluster_name": "gpu-router.xds"}}}}}
    manager = {
        "@type": TYPE_PREFIX + "envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "edge", "access_log": [als], "http_filters": [lua, router],
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]},
    }
    return {
        "node": {"id": "edge-utf8", "cluster": "gpu-router-edge"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "edge",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": manager}]}]}],
            "clusters": [static_cluster("gpu-router.xds", als_port, http2=True)],
        },
    }


def send_burst(port: int, notes: dict[str, bytes]) -> list[int]:
    """One request per note on one keep-alive connection, each `x-note` sent byte for byte."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    statuses = []
    try:
        for request_id, note in notes.items():
            connection.putrequest("GET", "/")
            connection.putheader("x-request-id", request_id)
            connection.putheader("x-note", note)
            connection.endheaders()
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        connection.close()
    return statuses


async def _run(tmp_path: Path) -> None:
    seen: dict[str, accesslog_pb2.HTTPAccessLogEntry] = {}
    repairs: list[tuple[str, str]] = []

    def count(kind: str, reason: str, *, dropped: bool = True) -> None:
        repairs.append((kind, reason))

    receiver = AccessLogReceiver(FleetHealth(), admit=edge_named("edge-utf8"), count=count,
                                 on_request=[lambda r: seen.setdefault(r.entry.request.request_id,
                                                                       r.entry)])
    server = grpc.aio.server()
    receiver.register(server)
    als_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    admin_port, listen_port = free_port(), free_port()
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps(bootstrap(admin_port, listen_port, als_port)))
    envoy = ManagedProcess("envoy", [envoy_binary(), "-c", str(config), "--disable-hot-restart",
                                     "-l", "warning", "--concurrency", "1"], tmp_path / "envoy.log")
    notes = {"before": b"plain", "latin-1": b"caf\xe9", "lone-byte": b"\xff", "after": b"plain"}
    try:
        envoy.start()
        await asyncio.to_thread(envoy.wait_until, EnvoyAdmin(admin_port).ready, "admin /ready")
        assert await asyncio.to_thread(send_burst, listen_port, notes) == [200] * 4
        await eventually(lambda: len(seen) == 4, "all four entries", timeout_s=15.0,
                         interval_s=0.05)
        assert await asyncio.to_thread(send_burst, listen_port, {"later": b"\xfe"}) == [200]
        await eventually(lambda: "later" in seen, "an entry after them on the same stream",
                         timeout_s=15.0, interval_s=0.05)
    finally:
        envoy.stop()
        await server.stop(grace=None)

    def note(request_id: str) -> str:
        request = seen[request_id].common_properties.metadata.filter_metadata["gpu_router.request"]
        return request["note"]

    assert [note(r) for r in ("before", "latin-1", "lone-byte", "after", "later")] == [
        "plain", "caf\ufffd", "\ufffd", "plain", "\ufffd"]
    assert repairs == [("edge", "invalid_utf8")] * 3


def test_an_entry_with_invalid_utf8_costs_no_entry_of_its_batch(tmp_path: Path) -> None:
    asyncio.run(_run(tmp_path))

