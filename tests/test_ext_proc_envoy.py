"""ext_proc behind the real Envoy 1.40, configured as the common contract says.

A static bootstrap (the control plane is not under test here): the edge listener with
header_mutation -> ext_proc -> router, a cluster_header route plus the weighted
fallback, and two provider clusters that are tiny HTTP servers echoing what reached
them. The fake ADS server feeds ext_proc its policy.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from ext_proc_fixtures import POLICY_TYPE_URL, FakeAds, eventually, offering

from gpu_router.api.v1 import routing_pb2
from gpu_router.processes import (
    EnvoyAdmin,
    ManagedProcess,
    envoy_binary,
    free_port,
    port_open,
    python_module,
)

BUFFER_LIMIT = 32 * 1024 * 1024
EXT_PROC_STATS = "http.edge.ext_proc."
TYPE = "type.googleapis.com/"
HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def policy() -> routing_pb2.RoutingPolicy:
    """alpha: cheaper for m1, calls it m1. beta: cheaper for m2, calls it beta/m2."""
    gpu = routing_pb2.Gpu(type="H100", memory_gb=80)
    return routing_pb2.RoutingPolicy(
        version="envoy-test",
        providers=[
            routing_pb2.Provider(
                name="alpha",
                cluster="alpha",
                gpus=[gpu],
                offerings=[
                    offering("m1", "m1", "H100", 0.1, 0.1),
                    offering("m2", "alpha/m2", "H100", 0.5, 0.5),
                ],
            ),
            routing_pb2.Provider(
                name="beta",
                cluster="beta",
                gpus=[gpu],
                offerings=[
                    offering("m1", "beta/m1", "H100", 0.2, 0.2),
                    offering("m2", "beta/m2", "H100", 0.1, 0.1),
                ],
            ),
        ],
        models=[routing_pb2.Model(name="m1"), routing_pb2.Model(name="m2")],
        policies=[routing_pb2.Policy(name="cheap", strategy=routing_pb2.COST, max_fallbacks=1)],
    )


class EchoUpstream(ThreadingHTTPServer):
    """A provider: answers what reached it (which upstream, the model in the body, sizes)."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(("127.0.0.1", 0), _EchoHandler)


class _EchoHandler(BaseHTTPRequestHandler):
    server: EchoUpstream

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        try:
            model = json.loads(body).get("model")
        except ValueError:
            model = None
        answer = json.dumps(
            {
                "upstream": self.server.name,
                "model": model,
                "bytes": len(body),
                "content_length": self.headers.get("content-length"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        """Quiet: the test reads answers, not logs."""


def _static_cluster(name: str, port: int, *, http2: bool = False) -> dict:
    cluster: dict = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "per_connection_buffer_limit_bytes": BUFFER_LIMIT,
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
                "@type": TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def bootstrap(
    edge: int, admin: int, ext_proc: int, upstreams: dict[str, int], access_log: Path
) -> dict:
    ext_proc_filter = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "gpu-router.ext_proc"}},
        "failure_mode_allow": True,
        "message_timeout": "1s",
        "allow_mode_override": True,
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SKIP",
            "request_body_mode": "BUFFERED",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        "metadata_options": {"receiving_namespaces": {"untyped": ["gpu_router"]}},
    }
    routes = [
        {
            "match": {
                "prefix": "/",
                "headers": [{"name": "x-gpu-router-cluster", "present_match": True}],
            },
            "route": {"cluster_header": "x-gpu-router-cluster", "timeout": "30s"},
            "response_headers_to_add": [
                {"header": {"key": "x-gpu-router-provider", "value": "%UPSTREAM_CLUSTER%"}},
                {
                    "header": {
                        "key": "x-gpu-router-reason",
                        "value": "%DYNAMIC_METADATA(gpu_router:reason)%",
                    }
                },
            ],
        },
        {
            "match": {"prefix": "/"},
            "route": {
                "weighted_clusters": {"clusters": [{"name": n, "weight": 1} for n in upstreams]}
            },
        },
    ]
    hcm = {
        "@type": TYPE + HCM,
        "stat_prefix": "edge",
        "route_config": {
            "name": "gpu-router.routes",
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
        },
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": TYPE + "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": str(access_log),
                    "log_format": {
                        "json_format": {
                            "status": "%RESPONSE_CODE%",
                            "cluster": "%UPSTREAM_CLUSTER%",
                            "gpu_router": "%DYNAMIC_METADATA(gpu_router)%",
                        }
                    },
                },
            }
        ],
        "http_filters": [
            {
                "name": "envoy.filters.http.header_mutation",
                "typed_config": {
                    "@type": TYPE
                    + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                    "mutations": {"request_mutations": [{"remove": "x-gpu-router-cluster"}]},
                },
            },
            {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc_filter},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    return {
        "node": {"id": "edge-test", "cluster": "gpu-router-edge"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "gpu-router.edge",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": edge}},
                    "per_connection_buffer_limit_bytes": BUFFER_LIMIT,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                _static_cluster("gpu-router.ext_proc", ext_proc, http2=True),
                *(_static_cluster(name, port) for name, port in upstreams.items()),
            ],
        },
    }


@dataclass
class Edge:
    port: int
    admin: EnvoyAdmin
    access_log: Path

    def post(self, body: bytes, **headers: str) -> tuple[int, dict[str, str], dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(
                "POST",
                "/v1/chat/completions",
                body=body,
                headers={
                    "content-type": "application/json",
                    **{k.replace("_", "-"): v for k, v in headers.items()},
                },
            )
            response = connection.getresponse()
            return (
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                json.loads(response.read()),
            )
        finally:
            connection.close()

    def ext_proc_stat(self, name: str) -> int:
        return self.admin.stats(EXT_PROC_STATS).get(EXT_PROC_STATS + name, 0)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    tmp = tmp_path_factory.mktemp("envoy")
    upstreams = [EchoUpstream("alpha"), EchoUpstream("beta")]
    threads = [threading.Thread(target=u.serve_forever, daemon=True) for u in upstreams]
    for thread in threads:
        thread.start()
    processes: list[ManagedProcess] = []
    try:
        with FakeAds() as ads:
            ads.publish(POLICY_TYPE_URL, "v1", policy())
            edge_port, admin_port, ext_proc_port = free_port(), free_port(), free_port()
            ext_proc = python_module(
                "ext_proc",
                "ext_proc",
                ["--listen", f"127.0.0.1:{ext_proc_port}", "--xds", ads.target],
                tmp,
            ).start()
            processes.append(ext_proc)
            config = tmp / "envoy.json"
            config.write_text(
                json.dumps(
                    bootstrap(
                        edge_port,
                        admin_port,
                        ext_proc_port,
                        {u.name: u.server_address[1] for u in upstreams},
                        tmp / "access.log",
                    )
                )
            )
            argv = [
                envoy_binary(),
                "-c",
                str(config),
                "--base-id",
                str(edge_port),
                "--log-level",
                "warning",
                "--file-flush-interval-msec",
                "50",
            ]
            envoy = ManagedProcess("envoy", argv, tmp / "envoy.log").start()
            processes.append(envoy)
            admin = EnvoyAdmin(admin_port)
            ext_proc.wait_until(lambda: port_open(ext_proc_port), "the ext_proc port")
            envoy.wait_until(admin.ready, "envoy ready")
            eventually(
                lambda: any(r.version_info == "v1" for r in ads.requests_for(POLICY_TYPE_URL)),
                "ext_proc to ACK the policy",
            )
            yield Edge(edge_port, admin, tmp / "access.log")
    finally:
        for process in reversed(processes):
            process.stop()
        for upstream in upstreams:
            upstream.shutdown()
            upstream.server_close()


def test_body_model_is_routed_to_the_picked_cluster_and_rewritten(edge: Edge) -> None:
    body = json.dumps({"model": "m2", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, headers, answer = edge.post(body)
    assert status == 200
    assert answer["upstream"] == "beta"
    assert answer["model"] == "beta/m2"
    assert answer["content_length"] == str(answer["bytes"])
    assert headers["x-gpu-router-provider"] == "beta"
    assert headers["x-gpu-router-reason"].startswith("cheapest: $")


def test_a_client_cannot_pick_the_cluster_itself(edge: Edge) -> None:
    status, _, answer = edge.post(b'{"model":"m2"}', x_gpu_router_cluster="alpha")
    assert (status, answer["upstream"]) == (200, "beta")


def test_header_model_never_sends_the_body_to_ext_proc(edge: Edge) -> None:
    sent_before = edge.ext_proc_stat("stream_msgs_sent")
    status, _, answer = edge.post(b'{"model":"m1","messages":[]}', x_gpu_router_model="m1")
    assert (status, answer["upstream"], answer["model"]) == (200, "alpha", "m1")
    eventually(lambda: edge.ext_proc_stat("stream_msgs_sent") > sent_before, "the stat to move")
    assert edge.ext_proc_stat("stream_msgs_sent") == sent_before + 1  # the headers, never the body


def test_a_body_above_a_mebibyte_routes(edge: Edge) -> None:
    messages = [{"role": "user", "content": "y" * (3 * 1024 * 1024)}]
    status, _, answer = edge.post(json.dumps({"model": "m2", "messages": messages}).encode())
    assert (status, answer["upstream"], answer["model"]) == (200, "beta", "beta/m2")
    rewritten = json.dumps({"model": "beta/m2", "messages": messages}, separators=(",", ":"))
    assert answer["bytes"] == len(rewritten) == int(answer["content_length"])


def test_models_list_is_answered_by_ext_proc(edge: Edge) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", edge.port, timeout=30)
    try:
        connection.request("GET", "/v1/models")
        response = connection.getresponse()
        assert response.status == 200
        assert [m["id"] for m in json.loads(response.read())["data"]] == ["m1", "m2"]
    finally:
        connection.close()


def test_invalid_json_is_a_400_openai_error(edge: Edge) -> None:
    status, headers, answer = edge.post(b'{"model": m2}')
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert answer["error"]["code"] == "invalid_json"
    assert answer["error"]["message"].startswith("invalid JSON body: ")
    assert headers["x-gpu-router-reason"].startswith("invalid JSON body: ")


def test_decision_metadata_reaches_the_access_log(edge: Edge) -> None:
    edge.post(b'{"model":"m1"}', x_request_id="audit-1")

    def logged() -> dict | None:
        for line in edge.access_log.read_text().splitlines() if edge.access_log.exists() else []:
            entry = json.loads(line)
            if (entry.get("gpu_router") or {}).get("request_id") == "audit-1":
                return entry
        return None

    entry = eventually(logged, "the access log line")
    assert entry["gpu_router"] == {
        "provider": "alpha",
        "model": "m1",
        "policy": "cheap",
        "strategy": "cost",
        "reason": "cheapest: $0.000026",
        "fallbacks": "beta",
        "request_id": "audit-1",
    }
