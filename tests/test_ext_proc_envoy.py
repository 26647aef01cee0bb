"""ext_proc behind the real Envoy 1.40, with the refactor contract's request path.

A static bootstrap (the control plane is not under test here): the edge listener drops a
client's cluster header early, then json_to_metadata (the body's model, max_tokens, ... into
gpu_router.request) -> ext_proc (request headers only, that namespace forwarded) -> router,
a cluster_header route plus the weighted fallback, and two provider clusters that are tiny
HTTP servers echoing what reached them. The fake ADS server feeds ext_proc its policy. No
upstream Lua filter here: what reaches a provider is the client's request unchanged.
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
from ext_proc_fixtures import POLICY_TYPE_URL, REQUEST_NAMESPACE, FakeAds, eventually, offering

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
    """alpha: cheaper for m1. beta: cheaper for m2 (alias "m2-alias")."""
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
        models=[routing_pb2.Model(name="m1"), routing_pb2.Model(name="m2", aliases=["m2-alias"])],
        policies=[routing_pb2.Policy(name="cheap", strategy=routing_pb2.COST, max_fallbacks=1)],
    )


class EchoUpstream(ThreadingHTTPServer):
    """A provider: answers what reached it (which upstream, path, body, sizes)."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(("127.0.0.1", 0), _EchoHandler)


class _EchoHandler(BaseHTTPRequestHandler):
    server: EchoUpstream

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        answer = json.dumps(
            {
                "upstream": self.server.name,
                "path": self.path,
                "body_prefix": body[:40].decode("utf-8", "replace"),
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


def _request_field(key: str, kind: str) -> dict:
    """A json_to_metadata rule copying the body's top-level `key` into gpu_router.request."""
    return {
        "selectors": [{"key": key}],
        "on_present": {"metadata_namespace": REQUEST_NAMESPACE, "key": key, "type": kind},
    }


def json_to_metadata() -> dict:
    """What the refactor contract has Envoy read from the body, so ext_proc never gets it."""
    model = _request_field("model", "STRING")
    model["on_error"] = {
        "metadata_namespace": REQUEST_NAMESPACE,
        "key": "body_error",
        "value": "invalid JSON",  # a google.protobuf.Value: in JSON, the plain value
    }
    return {
        "@type": TYPE + "envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
        "request_rules": {
            "rules": [
                model,
                _request_field("max_tokens", "NUMBER"),
                _request_field("max_completion_tokens", "NUMBER"),
                _request_field("stream", "PROTOBUF_VALUE"),
            ],
            "allow_content_types": ["application/json"],
            "allow_empty_content_type": True,
        },
    }


def bootstrap(
    edge: int, admin: int, ext_proc: int, upstreams: dict[str, int], access_log: Path
) -> dict:
    ext_proc_filter = {
        "@type": TYPE + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "gpu-router.ext_proc"}},
        "failure_mode_allow": True,
        "message_timeout": "1s",
        "allow_mode_override": False,
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SKIP",
            "request_body_mode": "NONE",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        "metadata_options": {
            "forwarding_namespaces": {"untyped": [REQUEST_NAMESPACE]},
            "receiving_namespaces": {"untyped": ["gpu_router"]},
        },
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
                            "request": "%DYNAMIC_METADATA(gpu_router.request)%",
                        }
                    },
                },
            }
        ],
        "early_header_mutation_extensions": [
            {
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": {
                    "@type": TYPE
                    + "envoy.extensions.http.early_header_mutation.header_mutation.v3"
                    + ".HeaderMutation",
                    "mutations": [{"remove": "x-gpu-router-cluster"}],
                },
            }
        ],
        "http_filters": [
            {"name": "envoy.filters.http.json_to_metadata", "typed_config": json_to_metadata()},
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

    def post(
        self,
        body: bytes,
        path: str = "/v1/chat/completions",
        content_type: str = "application/json",
        **headers: str,
    ) -> tuple[int, dict[str, str], dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(
                "POST",
                path,
                body=body,
                headers={
                    "content-type": content_type,
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

    def ext_proc_messages(self) -> tuple[int, int, int]:
        """(streams started, messages Envoy sent, messages it received) so far."""
        return (
            self.ext_proc_stat("streams_started"),
            self.ext_proc_stat("stream_msgs_sent"),
            self.ext_proc_stat("stream_msgs_received"),
        )

    def one_exchange_since(self, before: tuple[int, int, int]) -> bool:
        """Exactly one stream with one message each way since `before` (the counters settle)."""
        expected = tuple(n + 1 for n in before)
        eventually(lambda: self.ext_proc_messages() >= expected, "the ext_proc counters")
        return self.ext_proc_messages() == expected


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


def test_the_body_model_routes_to_the_picked_cluster_in_one_message(edge: Edge) -> None:
    before = edge.ext_proc_messages()
    body = json.dumps({"model": "m2", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, headers, answer = edge.post(body, "/v1/chat/completions?api-version=2")
    assert status == 200
    assert (answer["upstream"], answer["path"]) == ("beta", "/v1/chat/completions?api-version=2")
    assert answer["bytes"] == len(body) == int(answer["content_length"])  # ext_proc rewrote nothing
    assert headers["x-gpu-router-provider"] == "beta"
    assert headers["x-gpu-router-reason"].startswith("cheapest: $")
    assert edge.one_exchange_since(before)


def test_an_alias_in_the_body_resolves(edge: Edge) -> None:
    status, _, answer = edge.post(b'{"model":"m2-alias","max_tokens":5}')
    assert (status, answer["upstream"]) == (200, "beta")


def test_a_client_cannot_pick_the_cluster_itself(edge: Edge) -> None:
    status, _, answer = edge.post(b'{"model":"m2"}', x_gpu_router_cluster="alpha")
    assert (status, answer["upstream"]) == (200, "beta")


def test_a_body_above_a_mebibyte_routes_and_never_goes_to_ext_proc(edge: Edge) -> None:
    before = edge.ext_proc_messages()
    messages = [{"role": "user", "content": "y" * (3 * 1024 * 1024)}]
    body = json.dumps({"model": "m2", "messages": messages}).encode()
    status, _, answer = edge.post(body)
    assert (status, answer["upstream"], answer["bytes"]) == (200, "beta", len(body))
    assert edge.one_exchange_since(before)


def test_the_model_header_routes_a_body_json_to_metadata_does_not_read(edge: Edge) -> None:
    status, _, answer = edge.post(b"m2 please", content_type="text/plain", x_gpu_router_model="m1")
    assert (status, answer["upstream"], answer["body_prefix"]) == (200, "alpha", "m2 please")


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code", "message"),
    [
        (b'{"model": m2}', "application/json", 400, "invalid_json", "the request body is not a"),
        (b"", "application/json", 400, "missing_model", 'missing "model"'),
        (b'["m2"]', "application/json", 400, "missing_model", 'missing "model"'),
        (b'{"model": ""}', "application/json", 400, "missing_model", 'missing "model"'),
        (b'{"model": "m2"}', "text/plain", 400, "missing_model", "content-type 'text/plain'"),
        (b'{"model": "gpt-4"}', "application/json", 404, "model_not_found", "model 'gpt-4'"),
    ],
)
def test_unusable_requests_get_openai_errors(
    edge: Edge, body: bytes, content_type: str, status: int, code: str, message: str
) -> None:
    got, headers, answer = edge.post(body, content_type=content_type)
    assert (got, headers["content-type"], answer["error"]["code"]) == (
        status,
        "application/json",
        code,
    )
    assert answer["error"]["message"].startswith(message)
    assert headers["x-gpu-router-reason"].startswith(message)


def test_models_list_is_answered_by_ext_proc(edge: Edge) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", edge.port, timeout=30)
    try:
        connection.request("GET", "/v1/models")
        response = connection.getresponse()
        assert response.status == 200
        assert [m["id"] for m in json.loads(response.read())["data"]] == ["m1", "m2"]
    finally:
        connection.close()


def test_decision_metadata_reaches_the_access_log(edge: Edge) -> None:
    edge.post(
        b'{"model":"m1","max_tokens":3,"stream":false}',
        "/v1/chat/completions?a=b",
        x_request_id="audit-1",
    )

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
        "reason": "cheapest: $0.000001",  # 44 bytes / 4 + max_tokens 3 (not the default 256)
        "fallbacks": "beta",
        "request_id": "audit-1",
        "path": "/v1/chat/completions?a=b",
    }
    assert entry["request"] == {"model": "m1", "max_tokens": 3, "stream": False}
