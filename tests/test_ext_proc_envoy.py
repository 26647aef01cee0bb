"""ext_proc behind the real Envoy 1.40, with the refactor contract's request path.

A static bootstrap (the control plane is not under test here): the edge listener drops a
client's route header early, then json_to_metadata (the body's model, max_tokens, ... into
gpu_router.request) -> ext_proc (request headers only, that namespace forwarded) -> router.
As the failover contract has the control plane generate them: one route per ranked order of
providers, matched on the exact x-gpu-router-route value ext_proc sets, whose priority_group
cluster specifier and retry policy walk that order within one client request, plus the
no-header fallback route. Two provider clusters are tiny HTTP servers echoing what reached
them. The fake ADS server feeds ext_proc its policy and health. No upstream Lua filter here:
what reaches a provider is the client's request unchanged.
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from envoy_fixtures import static_cluster
from ext_proc_fixtures import (
    HEALTH_TYPE_URL,
    POLICY_TYPE_URL,
    REQUEST_NAMESPACE,
    FakeAds,
    health_entry,
    offering,
    snapshot,
)
from polling import eventually

from gpu_router.api.v1 import health_pb2, routing_pb2
from gpu_router.processes import (
    EnvoyAdmin,
    ManagedProcess,
    envoy_binary,
    free_port,
    port_open,
    python_module,
)

BUFFER_LIMIT = 32 * 1024 * 1024
ROUTE_HEADER = "x-gpu-router-route"
FAIL_HEADER = "x-test-fail"
"""Providers named in it answer 503 (the upstreams see the client's headers unchanged)."""
ROUTE_NAME_HEADER = "x-test-route"
"""The name of the route Envoy took: the order's header value, or "fallback"."""
POLICY = "cheap"
MAX_FALLBACKS = 1
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
        policies=[
            routing_pb2.Policy(name=POLICY, strategy=routing_pb2.COST, max_fallbacks=MAX_FALLBACKS)
        ],
    )


class EchoUpstream(ThreadingHTTPServer):
    """A provider: answers what reached it (which upstream, route, path, body, sizes)."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.request_ids: list[str] = []
        """x-request-id of every request that reached it, failed or not."""
        super().__init__(("127.0.0.1", 0), _EchoHandler)


class _EchoHandler(BaseHTTPRequestHandler):
    server: EchoUpstream

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        self.server.request_ids.append(self.headers.get("x-request-id", ""))
        failing = self.server.name in self.headers.get(FAIL_HEADER, "").split(",")
        answer = json.dumps(
            {
                "upstream": self.server.name,
                "route": self.headers.get(ROUTE_HEADER),
                "path": self.path,
                "body_prefix": body[:40].decode("utf-8", "replace"),
                "bytes": len(body),
                "content_length": self.headers.get("content-length"),
            }
        ).encode()
        self.send_response(503 if failing else 200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        """Quiet: the test reads answers, not logs."""


def _static_cluster(name: str, port: int, *, http2: bool = False) -> dict:
    return static_cluster(name, port, http2=http2, buffer_limit=BUFFER_LIMIT)


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


def _ordered_route(name: str, order: tuple[str, ...]) -> dict:
    """A route that tries the providers of `order` in turn, one per attempt (the lab's design)."""
    groups = [{"name": p, "clusters": [{"cluster_name": p, "weight": 1}]} for p in order]
    return {
        "name": name,
        "route": {
            "inline_cluster_specifier_plugin": {
                "extension": {
                    "name": "envoy.router.cluster_specifier_plugin.priority_group",
                    "typed_config": {
                        "@type": TYPE
                        + "envoy.extensions.router.cluster_specifiers.priority_group.v3"
                        + ".PriorityGroupClusterSpecifier",
                        "priority_groups": groups,
                    },
                }
            },
            "timeout": "30s",
            "retry_policy": {
                "retry_on": "5xx,reset,connect-failure,refused-stream,retriable-status-codes",
                "retriable_status_codes": [429],
                "num_retries": len(order) - 1,
                "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.02s"},
                "refresh_cluster_on_retry": True,
            },
        },
        "request_body_buffer_limit": BUFFER_LIMIT,
        "response_headers_to_add": [
            {"header": {"key": "x-gpu-router-provider", "value": "%UPSTREAM_CLUSTER%"}},
            {"header": {"key": ROUTE_NAME_HEADER, "value": "%ROUTE_NAME%"}},
            {
                "header": {
                    "key": "x-gpu-router-reason",
                    "value": "%DYNAMIC_METADATA(gpu_router:reason)%",
                }
            },
        ],
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
    orders = [
        order
        for length in range(1, MAX_FALLBACKS + 2)
        for order in itertools.permutations(upstreams, length)
    ]
    routes = [
        {
            "match": {
                "prefix": "/",
                "headers": [
                    {
                        "name": ROUTE_HEADER,
                        "string_match": {"exact": f"{POLICY}/{','.join(order)}"},
                    }
                ],
            },
            **_ordered_route(f"{POLICY}/{','.join(order)}", order),
        }
        for order in orders
    ]
    routes.append({"match": {"prefix": "/"}, **_ordered_route("fallback", tuple(upstreams))})
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
                            "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
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
                    "mutations": [{"remove": ROUTE_HEADER}],
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
    upstreams: dict[str, EchoUpstream]
    ads: FakeAds

    def publish_health(self, version: str, *entries: health_pb2.ProviderHealth) -> None:
        """Send ext_proc a HealthSnapshot and wait for its ACK (it then decides on it)."""
        self.ads.publish(HEALTH_TYPE_URL, version, snapshot(*entries))
        eventually(
            lambda: any(r.version_info == version for r in self.ads.requests_for(HEALTH_TYPE_URL)),
            f"ext_proc to ACK health {version}",
        )

    def logged(self, request_id: str) -> dict:
        """The access-log line of the request with that x-request-id (Envoy flushes it soon)."""

        def find() -> dict | None:
            lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
            for line in lines:
                entry = json.loads(line)
                if (entry.get("gpu_router") or {}).get("request_id") == request_id:
                    return entry
            return None

        return eventually(find, f"the access log line of {request_id}")  # type: ignore[return-value]

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
            yield Edge(edge_port, admin, tmp / "access.log", {u.name: u for u in upstreams}, ads)
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


def test_a_client_cannot_pick_the_route_itself(edge: Edge) -> None:
    status, _, answer = edge.post(b'{"model":"m2"}', x_gpu_router_route=f"{POLICY}/alpha")
    assert (status, answer["upstream"], answer["route"]) == (200, "beta", f"{POLICY}/beta,alpha")


def test_a_503_from_the_winner_is_answered_by_the_fallback_in_the_same_request(
    edge: Edge,
) -> None:
    before = edge.ext_proc_messages()
    body = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, headers, answer = edge.post(body, x_test_fail="alpha", x_request_id="failover-1")
    assert (status, answer["upstream"], answer["route"]) == (200, "beta", f"{POLICY}/alpha,beta")
    assert answer["bytes"] == len(body)  # the retry re-sent the buffered body whole
    assert "failover-1" in edge.upstreams["alpha"].request_ids  # the winner was tried first
    assert (headers[ROUTE_NAME_HEADER], headers["x-gpu-router-provider"]) == (
        f"{POLICY}/alpha,beta",
        "beta",
    )
    assert headers["x-gpu-router-reason"].startswith("cheapest: $")
    assert edge.one_exchange_since(before)  # Envoy retried without asking ext_proc again
    entry = edge.logged("failover-1")
    assert (entry["status"], entry["cluster"], entry["attempts"]) == (200, "beta", 2)
    assert (entry["gpu_router"]["provider"], entry["gpu_router"]["fallbacks"]) == ("alpha", "beta")


def test_a_provider_cooling_down_is_left_out_of_the_order(edge: Edge) -> None:
    cooldown_ms = int((time.time() + 300) * 1000)
    try:
        edge.publish_health(
            "alpha-429",
            health_entry("alpha", state=health_pb2.EJECTED, cooldown_until_unix_ms=cooldown_ms),
        )
        status, headers, answer = edge.post(b'{"model":"m1"}', x_request_id="cooling-1")
        assert (status, answer["upstream"], headers[ROUTE_NAME_HEADER]) == (
            200,
            "beta",
            f"{POLICY}/beta",
        )
        status, _, answer = edge.post(
            b'{"model":"m1"}', x_test_fail="beta", x_request_id="cooling-2"
        )
        assert (status, answer["upstream"]) == (503, "beta")  # no retry on alpha: not in the order
        assert not {"cooling-1", "cooling-2"} & set(edge.upstreams["alpha"].request_ids)
        assert edge.logged("cooling-1")["gpu_router"]["reason"].endswith("; alpha ejected")
    finally:
        edge.publish_health("all-healthy")
    status, _, answer = edge.post(b'{"model":"m1"}')
    assert (status, answer["upstream"], answer["route"]) == (200, "alpha", f"{POLICY}/alpha,beta")


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

    entry = edge.logged("audit-1")
    assert entry["gpu_router"] == {
        "provider": "alpha",
        "model": "m1",
        "policy": "cheap",
        "strategy": "cost",
        "reason": "cheapest: $0.000001",  # 44 bytes / 4 + max_tokens 3 (not the default 256)
        "fallbacks": "beta",
        "candidates": "alpha=1.4e-06;beta=2.8e-06",
        "request_id": "audit-1",
        "path": "/v1/chat/completions?a=b",
    }
    assert entry["request"] == {"model": "m1", "max_tokens": 3, "stream": False}
