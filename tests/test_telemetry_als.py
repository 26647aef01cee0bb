"""AccessLogReceiver fed by a real Envoy's http_grpc access logger.

Test scaffolding: a static Envoy bootstrap whose listener sets the "gpu_router" dynamic metadata
with the set_metadata filter (standing in for ext_proc) and routes to a tiny local HTTP upstream
(cluster "prov-a"), to a dead port (cluster "prov-dead"), or answers itself (direct response).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from control_plane.telemetry.als import AccessLogReceiver
from control_plane.telemetry.health import PROVIDER_WIDE, FleetHealth, HealthState
from gpu_router.processes import EnvoyAdmin, ManagedProcess, envoy_binary, free_port, http_get

POLL_DEADLINE_S = 15.0
TYPE_PREFIX = "type.googleapis.com/"


class _Upstream(BaseHTTPRequestHandler):
    """/fail answers 503, anything else 200 with a small JSON body."""

    def do_GET(self) -> None:
        status = 503 if self.path.startswith("/fail") else 200
        body = b'{"ok": true}'
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstream_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _static_cluster(name: str, port: int, *, http2: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": TYPE_PREFIX + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def envoy_bootstrap(
    *, admin_port: int, listen_port: int, upstream_port: int, dead_port: int, als_port: int
) -> dict[str, Any]:
    access_log = {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": TYPE_PREFIX
            + "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": "gpu-router.edge",
                "transport_api_version": "V3",
                "buffer_flush_interval": "0.1s",
                "grpc_service": {"envoy_grpc": {"cluster_name": "gpu-router.xds"}},
            },
        },
    }
    set_metadata = {
        "name": "envoy.filters.http.set_metadata",
        "typed_config": {
            "@type": TYPE_PREFIX + "envoy.extensions.filters.http.set_metadata.v3.Config",
            "metadata": [
                {
                    "metadata_namespace": "gpu_router",
                    "value": {
                        "model": "m1",
                        "provider": "prov-a",
                        "reason": "test",
                        "policy": "default",
                    },
                }
            ],
        },
    }
    routes = [
        {"match": {"prefix": "/dead"}, "route": {"cluster": "prov-dead"}},
        {
            "match": {"prefix": "/local"},
            "direct_response": {"status": 404, "body": {"inline_string": "no"}},
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "prov-a"}},
    ]
    manager = {
        "@type": TYPE_PREFIX + "envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "edge",
        "access_log": [access_log],
        "route_config": {
            "name": "test",
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            set_metadata,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": TYPE_PREFIX + "envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
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
                _static_cluster("prov-a", upstream_port),
                _static_cluster("prov-dead", dead_port),
                _static_cluster("gpu-router.xds", als_port, http2=True),
            ],
        },
    }


def now_ms() -> int:
    return int(time.time() * 1000)


async def _eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + POLL_DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _run(tmp_path: Path, upstream: int) -> None:
    fleet = FleetHealth(eject_min_samples=3)
    server = grpc.aio.server()
    AccessLogReceiver(fleet).register(server)
    als_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    admin_port, listen_port = free_port(), free_port()
    config = tmp_path / "envoy.json"
    config.write_text(
        json.dumps(
            envoy_bootstrap(
                admin_port=admin_port,
                listen_port=listen_port,
                upstream_port=upstream,
                dead_port=free_port(),
                als_port=als_port,
            )
        )
    )
    envoy = ManagedProcess(
        "envoy",
        [envoy_binary(), "-c", str(config), "--disable-hot-restart", "-l", "warning"],
        tmp_path / "envoy.log",
    )
    try:
        envoy.start()
        await asyncio.to_thread(envoy.wait_until, EnvoyAdmin(admin_port).ready, "admin /ready")

        async def get(path: str) -> int:
            status, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{listen_port}{path}")
            return status

        # Logged first on the one ALS stream, so it has been received once the others are.
        assert await get("/local") == 404
        assert [await get("/v1/chat") for _ in range(3)] == [200, 200, 200]

        def samples(provider: str) -> int:
            view = fleet.get(provider, "m1", now_ms())
            return 0 if view is None else view.samples

        await _eventually(lambda: samples("prov-a") >= 3, "three prov-a/m1 samples")
        healthy = fleet.get("prov-a", "m1", now_ms())
        assert healthy is not None
        assert healthy.error_rate == 0.0 and healthy.state is HealthState.HEALTHY
        assert healthy.ewma_latency_ms is not None and healthy.ewma_latency_ms > 0
        assert (
            healthy.ewma_ttfb_ms is not None and 0 < healthy.ewma_ttfb_ms <= healthy.ewma_latency_ms
        )
        # The direct response reached no provider: only prov-a is known.
        assert {view.provider for view in fleet.entries(now_ms())} == {"prov-a"}

        assert [await get("/fail") for _ in range(3)] == [503, 503, 503]
        await _eventually(lambda: samples("prov-a") >= 6, "the 503 samples")
        failing = fleet.get("prov-a", PROVIDER_WIDE, now_ms())
        assert failing is not None and failing.error_rate == pytest.approx(0.5)
        assert (
            failing.state is HealthState.EJECTED
        )  # 3 errors in 6 samples reaches eject_error_rate 0.5
        assert failing.ewma_latency_ms == healthy.ewma_latency_ms  # failures never feed the EWMA

        assert [await get("/dead") for _ in range(3)] == [503, 503, 503]
        await _eventually(lambda: samples("prov-dead") >= 3, "the connection-failure samples")
        dead = fleet.get("prov-dead", "m1", now_ms())
        assert dead is not None and dead.error_rate == 1.0 and dead.state is HealthState.EJECTED
        assert dead.ewma_latency_ms is None
    finally:
        envoy.stop()
        await server.stop(grace=None)


def test_envoy_access_logs_feed_fleet_health(tmp_path: Path, upstream_port: int) -> None:
    asyncio.run(_run(tmp_path, upstream_port))
