"""AccessLogReceiver fed by a real Envoy: router upstream_log attempts feed FleetHealth (per
model once the request's entry names it), listener entries go to the on_request hooks.

Test scaffolding: a static Envoy bootstrap whose listener sets the "gpu_router" dynamic metadata
with the set_metadata filter (standing in for ext_proc) and routes with the priority_group
cluster specifier and a retry policy, as the generated config does: "/" tries prov-a then
prov-b, "/dead" tries prov-dead (nothing listens) then prov-b; "/local" is a direct response.
The upstreams keep connections alive, so attempts share upstream connections. The listener
also writes the durable edge file log, whose lines must give the records the ALS entries give.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy_fixtures import static_cluster
from google.protobuf import json_format
from telemetry_fixtures import edge_named, eventually

from control_plane.ledger.reconcile import read_chunk
from control_plane.telemetry.als import ATTEMPT_LOG_NAME, EDGE_LOG_NAME, AccessLogReceiver
from control_plane.telemetry.client_request import ClientRequest, record_from_edge_entry
from control_plane.telemetry.health import PROVIDER_WIDE, FleetHealth, HealthState
from control_plane.translate.durable_log import durable_edge_log
from control_plane.translate.listeners import failed_attempts_only
from control_plane.translate.settings import EdgeSettings
from control_plane.usage.record import RequestRecord
from gpu_router.processes import EnvoyAdmin, ManagedProcess, envoy_binary, free_port, http_get

TYPE_PREFIX = "type.googleapis.com/"
RETRY_AFTER_S = 30


class _Upstream(BaseHTTPRequestHandler):
    """200 with a small JSON body; a rate-limiting one answers /ratelimit 429 with Retry-After."""

    rate_limits = False
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        limited = self.rate_limits and self.path.startswith("/ratelimit")
        body = b'{"ok": true}'
        self.send_response(429 if limited else 200)
        if limited:
            self.send_header("retry-after", str(RETRY_AFTER_S))
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _RateLimitingUpstream(_Upstream):
    rate_limits = True


def _serve(handler: type[_Upstream]) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def upstream_port() -> Iterator[int]:
    yield from _serve(_RateLimitingUpstream)


@pytest.fixture
def second_upstream_port() -> Iterator[int]:
    yield from _serve(_Upstream)


def _static_cluster(name: str, port: int, *, http2: bool = False) -> dict:
    return static_cluster(name, port, http2=http2, connect_timeout="0.25s")


def _grpc_log(log_name: str, **extra: Any) -> dict[str, Any]:
    common_config = {
        "log_name": log_name,
        "transport_api_version": "V3",
        "buffer_flush_interval": "0.1s",
        "grpc_service": {"envoy_grpc": {"cluster_name": "gpu-router.xds"}},
    }
    return {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": TYPE_PREFIX
            + "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": common_config,
            **extra,
        },
    }


def _failover_route(prefix: str, order: list[str]) -> dict[str, Any]:
    specifier = {
        "@type": TYPE_PREFIX + "envoy.extensions.router.cluster_specifiers.priority_group.v3"
        ".PriorityGroupClusterSpecifier",
        "priority_groups": [
            {"name": name, "clusters": [{"cluster_name": name, "weight": 1}]} for name in order
        ],
    }
    return {
        "match": {"prefix": prefix},
        "route": {
            "inline_cluster_specifier_plugin": {
                "extension": {
                    "name": "envoy.router.cluster_specifier_plugin.priority_group",
                    "typed_config": specifier,
                }
            },
            "retry_policy": {
                "retry_on": "5xx,reset,connect-failure,refused-stream,retriable-status-codes",
                "retriable_status_codes": [429],
                "num_retries": len(order) - 1,
                "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.02s"},
                "refresh_cluster_on_retry": True,
            },
        },
    }


def _durable_log(path: Path) -> dict[str, Any]:
    """The edge's durable request log (translate/durable_log.py), written to `path`."""
    (access_log,) = durable_edge_log(EdgeSettings(edge_log_dir=str(path.parent)))
    config = file_pb2.FileAccessLog()
    access_log.typed_config.Unpack(config)
    config.path = str(path)
    return {"name": access_log.name,
            "typed_config": {"@type": TYPE_PREFIX + config.DESCRIPTOR.full_name,
                             **json_format.MessageToDict(config, preserving_proto_field_name=True)}}


def envoy_bootstrap(
    *, admin_port: int, listen_port: int, upstream_ports: tuple[int, int], als_port: int,
    edge_file: Path,
) -> dict[str, Any]:
    set_metadata = {
        "name": "envoy.filters.http.set_metadata",
        "typed_config": {
            "@type": TYPE_PREFIX + "envoy.extensions.filters.http.set_metadata.v3.Config",
            "metadata": [
                {
                    "metadata_namespace": "gpu_router",
                    "value": {"model": "m1", "provider": "prov-a", "reason": "test"},
                }
            ],
        },
    }
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": TYPE_PREFIX + "envoy.extensions.filters.http.router.v3.Router",
            "upstream_log": [{
                **_grpc_log(ATTEMPT_LOG_NAME, additional_response_headers_to_log=["retry-after"]),
                # As the edge logs attempts: failed ones only (the served one is on the edge's).
                "filter": json_format.MessageToDict(failed_attempts_only()),
            }],
        },
    }
    routes = [
        {
            "match": {"prefix": "/local"},
            "direct_response": {"status": 404, "body": {"inline_string": "no"}},
        },
        _failover_route("/dead", ["prov-dead", "prov-b"]),
        _failover_route("/", ["prov-a", "prov-b"]),
    ]
    manager = {
        "@type": TYPE_PREFIX + "envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "edge",
        "access_log": [_grpc_log(EDGE_LOG_NAME), _durable_log(edge_file)],
        "route_config": {
            "name": "test",
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [set_metadata, router],
    }
    return {
        "node": {"id": "edge-test-1", "cluster": "gpu-router-edge"},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "gpu-router.edge",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listen_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                _static_cluster("prov-a", upstream_ports[0]),
                _static_cluster("prov-b", upstream_ports[1]),
                _static_cluster("prov-dead", free_port()),
                _static_cluster("gpu-router.xds", als_port, http2=True),
            ],
        },
    }


eventually_soon = functools.partial(eventually, timeout_s=15.0, interval_s=0.05)
"""Envoy batches access logs for up to 100 ms; a real process is slower than a fake clock."""


def now_ms() -> int:
    return int(time.time() * 1000)


async def _run(tmp_path: Path, upstreams: tuple[int, int]) -> None:
    fleet = FleetHealth(eject_min_samples=3, cooldown_s=10.0)
    requests: list[tuple[accesslog_pb2.HTTPAccessLogEntry, str]] = []

    def broken_hook(request: ClientRequest) -> None:
        raise RuntimeError("a failing subscriber")

    receiver = AccessLogReceiver(fleet, on_request=[broken_hook], admit=edge_named("edge-test-1"))
    receiver.on_request.append(lambda request: requests.append((request.entry, request.node)))
    server = grpc.aio.server()
    receiver.register(server)
    als_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    admin_port, listen_port = free_port(), free_port()
    edge_file = tmp_path / "edge-test-1.access.jsonl"
    config = tmp_path / "envoy.json"
    config.write_text(
        json.dumps(
            envoy_bootstrap(
                admin_port=admin_port,
                listen_port=listen_port,
                upstream_ports=upstreams,
                als_port=als_port,
                edge_file=edge_file,
            )
        )
    )
    envoy = ManagedProcess(
        "envoy",
        [envoy_binary(), "-c", str(config), "--disable-hot-restart", "-l", "warning",
         "--file-flush-interval-msec", "50"],
        tmp_path / "envoy.log",
    )
    try:
        envoy.start()
        await asyncio.to_thread(envoy.wait_until, EnvoyAdmin(admin_port).ready, "admin /ready")

        async def get(path: str) -> int:
            status, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{listen_port}{path}")
            return status

        def samples(provider: str, model: str = PROVIDER_WIDE) -> int:
            view = fleet.get(provider, model, now_ms())
            return 0 if view is None else view.samples

        assert await get("/local") == 404
        assert [await get("/v1/chat") for _ in range(3)] == [200, 200, 200]
        await eventually_soon(lambda: samples("prov-a", "m1") >= 3, "three prov-a/m1 samples")
        healthy = fleet.get("prov-a", "m1", now_ms())
        assert healthy is not None and healthy.state is HealthState.HEALTHY
        assert healthy.ewma_latency_ms is not None and healthy.ewma_latency_ms > 0
        assert (
            healthy.ewma_ttfb_ms is not None and 0 < healthy.ewma_ttfb_ms <= healthy.ewma_latency_ms
        )

        before_ms = now_ms()
        assert await get("/ratelimit") == 200  # prov-a's 429 was answered by prov-b
        # The 429 comes on the attempt log, the prov-b answer on the edge log: two streams,
        # flushed each on its own, in either order.
        await eventually_soon(lambda: samples("prov-a") >= 4 and samples("prov-b", "m1") >= 1,
                              "the 429 attempt and the prov-b attempt after it")
        after_ms = now_ms()
        limited = fleet.get("prov-a", PROVIDER_WIDE, after_ms)
        assert limited is not None and limited.state is HealthState.EJECTED
        assert limited.samples == 4 and limited.rate_429 == pytest.approx(1 / 4)
        assert (
            before_ms + RETRY_AFTER_S * 1000
            <= limited.cooldown_until_unix_ms
            <= after_ms + RETRY_AFTER_S * 1000
        )
        shown = fleet.to_json(after_ms)["providers"]["prov-a"]
        assert shown["state"] == "ejected"
        assert shown["reason"] == f"rate limited (Retry-After {RETRY_AFTER_S} s)"
        assert shown["last_ejected_at"] == shown["first_failure_at"] is not None

        # A dead provider fails every attempt though every client request succeeds.
        assert [await get("/dead") for _ in range(3)] == [200, 200, 200]
        await eventually_soon(lambda: samples("prov-dead") >= 3, "the connection-failure attempts")
        dead = fleet.get("prov-dead", PROVIDER_WIDE, now_ms())
        assert dead is not None and dead.error_rate == 1.0 and dead.state is HealthState.EJECTED
        assert dead.reason == "error rate 100% over 30 s" and dead.ewma_latency_ms is None

        # Client requests reach the hooks (past the failing one) and never count as samples.
        await eventually_soon(lambda: len(requests) == 8, "the eight client-request entries")
        assert {node for _, node in requests} == {"edge-test-1"}
        by_path = {entry.request.path: entry.common_properties for entry, _ in requests}
        assert by_path["/ratelimit"].upstream_cluster == "prov-b"
        assert by_path["/ratelimit"].upstream_request_attempt_count == 2
        assert by_path["/local"].upstream_cluster == ""
        # Every attempt counted once for its provider and once for its model; no more.
        await eventually_soon(lambda: samples("prov-dead", "m1") == 3, "the dead attempts' model")
        for provider, attempts in {"prov-a": 4, "prov-b": 4, "prov-dead": 3}.items():
            assert (samples(provider), samples(provider, "m1")) == (attempts, attempts)
        per_model = fleet.get("prov-a", "m1", now_ms())
        assert per_model is not None and per_model.rate_429 == pytest.approx(1 / 4)
        assert per_model.state is HealthState.HEALTHY  # the 429 ejects the provider, not a model

        # The durable file log gives the very record the ALS entry gives, request by request.
        def file_records() -> dict[str, RequestRecord | None]:
            """As the reconciler reads the file: complete lines only."""
            entries = read_chunk(edge_file, None).entries if edge_file.exists() else ()
            return {record.request_id: record for record in map(record_from_edge_entry, entries)
                    if record is not None}

        await eventually_soon(lambda: len(file_records()) == 8, "eight lines in the edge file")
        als = {entry.request.request_id: record_from_edge_entry(entry)
               for entry, _ in requests}
        assert file_records() == als
    finally:
        envoy.stop()
        await server.stop(grace=None)


def test_envoy_attempt_logs_feed_fleet_health_and_requests_reach_hooks(
    tmp_path: Path, upstream_port: int, second_upstream_port: int
) -> None:
    asyncio.run(_run(tmp_path, (upstream_port, second_upstream_port)))
