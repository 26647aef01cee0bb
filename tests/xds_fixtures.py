"""Test scaffolding for the xDS tests: hand-built Envoy resources, an ADS server on its own
event-loop thread, and a minimal Envoy bootstrap pointing at it (production's is
envoy/bootstrap.yaml)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.service.discovery.v3 import ads_pb2_grpc
from google.protobuf import any_pb2, duration_pb2

from control_plane.policy.load import default_policy_path
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.node import Node
from control_plane.xds.peer import NODE_CLUSTERS, Peer
from control_plane.xds.server import AggregatedDiscoveryServer
from gpu_router.bootstrap import edge_secrets, xds_transport_socket
from gpu_router.pki import TlsFiles
from gpu_router.processes import EnvoyAdmin, ManagedProcess, envoy_binary, free_port

T = TypeVar("T")

ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
)


def _address(port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def cluster(name: str) -> cluster_pb2.Cluster:
    """An EDS cluster fed over ADS."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        connect_timeout=duration_pb2.Duration(seconds=1),
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ADS),
    )


def rejected_cluster(name: str) -> cluster_pb2.Cluster:
    """Valid as a proto, rejected by Envoy: LOGICAL_DNS allows exactly one endpoint."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.LOGICAL_DNS,
        connect_timeout=duration_pb2.Duration(seconds=1),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(address=_address(p))
                        )
                        for p in (8001, 8002)
                    ]
                )
            ],
        ),
    )


def endpoints(name: str, port: int) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=_address(port))
                    )
                ]
            )
        ],
    )


def listener(name: str, port: int, route_name: str) -> listener_pb2.Listener:
    """An HTTP listener whose routes come over RDS."""
    manager = hcm.HttpConnectionManager(
        stat_prefix="edge",
        rds=hcm.Rds(config_source=ADS, route_config_name=route_name),
        http_filters=[
            hcm.HttpFilter(
                name="envoy.filters.http.router", typed_config=_packed(router_pb2.Router())
            )
        ],
    )
    return listener_pb2.Listener(
        name=name,
        address=_address(port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_packed(manager),
                    )
                ]
            )
        ],
    )


def route_config(name: str, cluster_name: str) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="all",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(cluster=cluster_name),
                    )
                ],
            )
        ],
    )


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def named(self, message: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage() == message]


def claimed_peer(context: grpc.aio.ServicerContext, node: Node) -> Peer:
    """Takes the node's claimed cluster for its role: for this plaintext test server only (the
    control plane reads the role from the client certificate, test_security.py)."""
    roles = {cluster: role for role, cluster in NODE_CLUSTERS.items()}
    return Peer(context.peer(), roles.get(node.cluster), node.id)


class AdsHarness:
    """An ADS server on 127.0.0.1:<port> on its own event-loop thread, so sync tests drive it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.cache: SnapshotCache
        self._server: grpc.aio.Server

    def start(self) -> AdsHarness:
        self._thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        self.cache = SnapshotCache()
        self._server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
            AggregatedDiscoveryServer(self.cache, claimed_peer), self._server
        )
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self._server.start()

    def run(self, coroutine: Awaitable[T], timeout: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)  # type: ignore[arg-type]
        return future.result(timeout)

    def call(self, function: Callable[[], T]) -> T:
        async def invoke() -> T:
            return function()

        return self.run(invoke())

    def stop(self) -> None:
        self.run(self._server.stop(grace=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


def bootstrap(
    node_id: str, admin_port: int, xds_port: int, node_cluster: str = "gpu-router-edge",
    tls: TlsFiles | None = None,
) -> dict:
    """A minimal ADS bootstrap; with `tls`, mutual TLS to the control plane (the real one
    requires it) and the static secrets its ext_proc cluster names, else plaintext
    (AdsHarness)."""
    config = _bootstrap(node_id, admin_port, xds_port, node_cluster)
    if tls is not None:
        [xds] = config["static_resources"]["clusters"]
        xds["transport_socket"] = xds_transport_socket(tls)
        config["static_resources"]["secrets"] = edge_secrets(tls)
    return config


def _bootstrap(node_id: str, admin_port: int, xds_port: int, node_cluster: str) -> dict:
    return {
        "node": {"id": node_id, "cluster": node_cluster},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "gpu-router.xds"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "gpu-router.xds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "gpu-router.xds",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": xds_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
        },
    }


@contextmanager
def running_envoy(
    tmp_path: Path, node_id: str, xds_port: int, tls: TlsFiles | None = None
) -> Iterator[tuple[ManagedProcess, EnvoyAdmin]]:
    """A real Envoy with the minimal ADS bootstrap; stopped on exit."""
    admin = EnvoyAdmin(free_port())
    config = tmp_path / f"{node_id}.json"
    config.write_text(json.dumps(bootstrap(node_id, admin.port, xds_port, tls=tls)))
    envoy = ManagedProcess(
        node_id,
        [envoy_binary(), "-c", str(config), "--disable-hot-restart", "-l", "info"],
        tmp_path / f"{node_id}.log",
    ).start()
    try:
        envoy.wait_until(lambda: admin.stats("server.state") != {}, "admin endpoint")
        yield envoy, admin
    finally:
        envoy.stop()


def dynamic_clusters(admin: EnvoyAdmin) -> dict[str, str]:
    """Active dynamic cluster name -> version_info, from /config_dump."""
    configs = admin.config_dump("dynamic_active_clusters").get("configs", [])
    return {entry["cluster"]["name"]: entry["version_info"] for entry in configs}


def policy_file(path: Path, *, without: tuple[str, ...] = ()) -> Path:
    """The embedded default policy, minus the named providers, written to `path`."""
    policy = yaml.safe_load(default_policy_path().read_text())
    policy["providers"] = [p for p in policy["providers"] if p["name"] not in without]
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path
