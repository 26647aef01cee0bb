"""ext_proc behind the real Envoy 1.40, on the edge configuration the translator generates.

A static bootstrap holds what the control plane would deliver over ADS for a two-provider policy
(translate(): the edge listener with its request-fields Lua, ext_proc and router filters, the
policy's routes that walk the order ext_proc names plus the fallback routes, the provider
clusters); the
control plane itself is not under test. The real ext_proc gets that policy and its health from
a fake ADS server; the access logs go to a collector. The two providers are tiny HTTP servers
echoing what reached them.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy_fixtures import AccessLogCollector, envoy_argv, grpc_server
from ext_proc_fixtures import (
    HEALTH_TYPE_URL,
    POLICY_TYPE_URL,
    FakeAds,
    health_entry,
    snapshot,
)
from google.protobuf import json_format
from polling import eventually
from translate_fixtures import static_bootstrap, write_bootstrap

from control_plane.policy.load import load_policy_text
from control_plane.policy.model import RoutingConfig
from control_plane.policy.wire import to_routing_policy
from control_plane.translate import EdgeSettings, translate
from control_plane.translate.names import (
    ACCESS_LOG_NAME,
    METADATA_NAMESPACE,
    REQUEST_METADATA_NAMESPACE,
    ROUTE_HEADER,
)
from control_plane.translate.routes import route_header_value
from gpu_router.api.v1 import health_pb2
from gpu_router.processes import EnvoyAdmin, ManagedProcess, free_port, port_open, python_module

FAIL_HEADER = "x-test-fail"
"""Providers named in it answer 503 (the upstreams see the client's headers)."""
POLICY = "cheap"
EXT_PROC_STATS = "http.edge.ext_proc."
POLICY_YAML = """\
version: 1
providers:
  - name: alpha
    base_url: http://127.0.0.1:{alpha}
    usage_format: none
    gpus: [{{type: H100, memory_gb: 80}}]
    models:
      - {{name: m1, gpu: H100, price: {{input: 0.1, output: 0.1}}}}
      - {{name: m2, gpu: H100, price: {{input: 0.5, output: 0.5}}}}
  - name: beta
    base_url: http://127.0.0.1:{beta}
    usage_format: none
    gpus: [{{type: H100, memory_gb: 80}}]
    models:
      - {{name: m1, gpu: H100, price: {{input: 0.2, output: 0.2}}}}
      - {{name: m2, gpu: H100, price: {{input: 0.1, output: 0.1}}}}
models:
  - {{name: m1}}
  - {{name: m2, aliases: [m2-alias]}}
policies:
  - {{name: cheap, strategy: cost, max_fallbacks: 1}}
"""
"""alpha: cheaper for m1. beta: cheaper for m2 (alias "m2-alias"). Each provider's ids are the
public names, so the body reaches it as the client sent it; the echoes report no usage."""


def policy(ports: dict[str, int]) -> RoutingConfig:
    return load_policy_text(POLICY_YAML.format(**ports), "ext-proc-envoy-test")


def _client_request_id(entry: accesslog_pb2.HTTPAccessLogEntry) -> str | None:
    fields = entry.common_properties.metadata.filter_metadata.get(REQUEST_METADATA_NAMESPACE)
    value = None if fields is None else fields.fields.get("client_request_id")
    return None if value is None else value.string_value


class EchoUpstream(ThreadingHTTPServer):
    """A provider: answers what reached it (which upstream, route, path, body, sizes)."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.request_ids: list[str] = []
        """x-request-id of every request that reached it, failed or not (the edge's own id)."""
        super().__init__(("127.0.0.1", 0), _EchoHandler)


class _EchoHandler(BaseHTTPRequestHandler):
    server: EchoUpstream

    def do_GET(self) -> None:
        """Envoy's active health checks."""
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

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


@dataclass
class Edge:
    port: int
    admin: EnvoyAdmin
    access_logs: AccessLogCollector
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
        """The edge access log's entry for the request the client sent with that x-request-id
        (which the edge logs as "client_request_id", making its own): the edge's id, the
        outcome, ext_proc's decision ("gpu_router") and the body fields Envoy read ("request")."""

        def find() -> list:
            return [entry for name, entry in list(self.access_logs.entries)
                    if name == ACCESS_LOG_NAME and _client_request_id(entry) == request_id]

        (entry,) = eventually(find, f"the access log entry of {request_id}")
        common, metadata = entry.common_properties, entry.common_properties.metadata
        return {
            "request_id": entry.request.request_id,
            "status": entry.response.response_code.value,
            "cluster": common.upstream_cluster,
            "attempts": common.upstream_request_attempt_count,
            **{key: json_format.MessageToDict(metadata.filter_metadata[namespace])
               for key, namespace in (("gpu_router", METADATA_NAMESPACE),
                                      ("request", REQUEST_METADATA_NAMESPACE))
               if namespace in metadata.filter_metadata},
        }

    def route(self, request_id: str) -> str:
        """What ext_proc picked for the request: "<policy>/<ranked providers>", from the order
        the route walked (the metadata its priority_group specifier read)."""
        decision = self.logged(request_id)["gpu_router"]
        order = [group["name"] for group in decision["priority_groups"]]
        return f"{decision['policy']}/{','.join(order)}"

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
    upstreams = {name: EchoUpstream(name) for name in ("alpha", "beta")}
    threads = [threading.Thread(target=u.serve_forever, daemon=True) for u in upstreams.values()]
    for thread in threads:
        thread.start()
    config = policy({name: u.server_address[1] for name, u in upstreams.items()})
    edge_port, admin_port, ext_proc_port, als_port = free_port(), free_port(), free_port(), free_port()
    settings = EdgeSettings(edge_port=edge_port, ext_proc_endpoints=(("127.0.0.1", ext_proc_port),))
    bootstrap = write_bootstrap(
        static_bootstrap(translate(config, settings, {}), admin_port=admin_port, xds_port=als_port),
        tmp / "envoy.pb",
    )
    access_logs, als_server = AccessLogCollector(), grpc_server(als_port)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(access_logs, als_server)
    als_server.start()
    processes: list[ManagedProcess] = []
    try:
        with FakeAds() as ads:
            ads.publish(POLICY_TYPE_URL, "v1", to_routing_policy(config))
            ext_proc = python_module(
                "ext_proc",
                "ext_proc",
                ["--listen", f"127.0.0.1:{ext_proc_port}", "--xds", ads.target,
                 *ads.client_flags()],
                tmp,
            ).start()
            processes.append(ext_proc)
            argv = envoy_argv(bootstrap, "--file-flush-interval-msec", "50")
            envoy = ManagedProcess("envoy", argv, tmp / "envoy.log").start()
            processes.append(envoy)
            admin = EnvoyAdmin(admin_port)
            ext_proc.wait_until(lambda: port_open(ext_proc_port), "the ext_proc port")
            envoy.wait_until(admin.ready, "envoy ready")
            eventually(
                lambda: any(r.version_info == "v1" for r in ads.requests_for(POLICY_TYPE_URL)),
                "ext_proc to ACK the policy",
            )
            healthy = [f"{name}::127.0.0.1:{port}::health_flags::healthy" for name, port in
                       [*((n, u.server_address[1]) for n, u in upstreams.items()),
                        ("gpu-router.ext_proc", ext_proc_port)]]
            envoy.wait_until(lambda: all(h in admin.clusters() for h in healthy), "all healthy")
            yield Edge(edge_port, admin, access_logs, upstreams, ads)
    finally:
        for process in reversed(processes):
            process.stop()
        als_server.stop(grace=None)
        for upstream in upstreams.values():
            upstream.shutdown()
            upstream.server_close()


def test_the_body_model_routes_to_the_picked_cluster_in_one_message(edge: Edge) -> None:
    before = edge.ext_proc_messages()
    body = json.dumps({"model": "m2", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, headers, answer = edge.post(body, "/v1/chat/completions?api-version=2")
    assert status == 200
    assert (answer["upstream"], answer["path"]) == ("beta", "/v1/chat/completions?api-version=2")
    assert answer["bytes"] == len(body) == int(answer["content_length"])  # nothing rewritten
    assert answer["route"] is None  # the route header stays at the edge
    assert headers["x-gpu-router-provider"] == "beta"
    assert headers["x-gpu-router-reason"].startswith("cheapest: $")
    assert edge.one_exchange_since(before)


def test_an_alias_in_the_body_resolves(edge: Edge) -> None:
    status, _, answer = edge.post(b'{"model":"m2-alias","max_tokens":5}')
    assert (status, answer["upstream"]) == (200, "beta")


def test_a_client_cannot_pick_the_route_itself(edge: Edge) -> None:
    # A value a real route matches: m1's single-attempt route, whose order starts at alpha.
    forged = route_header_value(POLICY, "m1", 1)
    status, _, answer = edge.post(b'{"model":"m2"}', x_gpu_router_route=forged,
                                  x_request_id="picky-1")
    assert (status, answer["upstream"], answer["route"]) == (200, "beta", None)
    assert edge.route("picky-1") == f"{POLICY}/beta,alpha"


def test_a_503_from_the_winner_is_answered_by_the_fallback_in_the_same_request(
    edge: Edge,
) -> None:
    before = edge.ext_proc_messages()
    body = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, headers, answer = edge.post(body, x_test_fail="alpha", x_request_id="failover-1")
    assert (status, answer["upstream"], headers["x-gpu-router-provider"]) == (200, "beta", "beta")
    assert answer["bytes"] == len(body)  # the retry re-sent the buffered body whole
    edge_id = edge.logged("failover-1")["request_id"]
    assert edge_id in edge.upstreams["alpha"].request_ids  # the winner was tried first
    assert edge.upstreams["beta"].request_ids[-1] == edge_id
    assert edge.route("failover-1") == f"{POLICY}/alpha,beta"
    assert headers["x-gpu-router-reason"].startswith("cheapest: $")
    assert edge.one_exchange_since(before)  # Envoy retried without asking ext_proc again
    entry = edge.logged("failover-1")
    assert (entry["status"], entry["cluster"], entry["attempts"]) == (200, "beta", 2)
    assert (entry["gpu_router"]["provider"], entry["gpu_router"]["fallbacks"]) == ("alpha", "beta")


def test_a_provider_cooling_down_is_the_last_fallback(edge: Edge) -> None:
    """Tried only after every eligible provider failed the same request: the fleet's ejection
    trails the provider, and trying it beats failing the client."""
    cooldown_ms = int((time.time() + 300) * 1000)
    try:
        edge.publish_health(
            "alpha-429",
            health_entry("alpha", state=health_pb2.EJECTED, cooldown_until_unix_ms=cooldown_ms),
        )
        status, _, answer = edge.post(b'{"model":"m1"}', x_request_id="cooling-1")
        assert (status, answer["upstream"]) == (200, "beta")
        assert edge.route("cooling-1") == f"{POLICY}/beta,alpha"
        edge_id = edge.logged("cooling-1")["request_id"]
        assert edge_id not in set(edge.upstreams["alpha"].request_ids)  # beta served it first
        status, _, answer = edge.post(
            b'{"model":"m1"}', x_test_fail="beta", x_request_id="cooling-2"
        )
        assert (status, answer["upstream"]) == (200, "alpha")  # the last resort served
        assert edge.logged("cooling-1")["gpu_router"]["reason"].endswith("; alpha ejected")
    finally:
        edge.publish_health("all-healthy")
    status, _, answer = edge.post(b'{"model":"m1"}', x_request_id="cooled-1")
    assert (status, answer["upstream"], edge.route("cooled-1")) == (200, "alpha", f"{POLICY}/alpha,beta")


def test_a_body_above_a_mebibyte_routes_and_never_goes_to_ext_proc(edge: Edge) -> None:
    before = edge.ext_proc_messages()
    messages = [{"role": "user", "content": "y" * (3 * 1024 * 1024)}]
    body = json.dumps({"model": "m2", "messages": messages}).encode()
    status, _, answer = edge.post(body)
    assert (status, answer["upstream"], answer["bytes"]) == (200, "beta", len(body))
    assert edge.one_exchange_since(before)


def test_a_body_envoy_does_not_read_is_refused_even_with_a_model_header(edge: Edge) -> None:
    """Its model could differ from the header's, and no provider would be told otherwise."""
    before = edge.ext_proc_messages()
    status, _, answer = edge.post(b"m2 please", content_type="text/plain", x_gpu_router_model="m1")
    assert (status, answer["error"]["code"]) == (415, "unsupported_media_type")
    assert edge.ext_proc_messages() == before


UNREADABLE = "the request body cannot be read one way only: "


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code", "message"),
    [
        (b'{"model": m2}', "application/json", 400, "invalid_json", UNREADABLE),
        (b"", "application/json", 400, "missing_model", 'missing "model"'),
        (b'["m2"]', "application/json", 400, "invalid_json", UNREADABLE),
        (b'{"model": ""}', "application/json", 400, "missing_model", 'missing "model"'),
        (b'{"model": "m2"}', "text/plain", 415, "unsupported_media_type",
         "an inference request body must be application/json, not text/plain"),
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
    assert entry["request_id"] != "audit-1"
    assert entry["gpu_router"] == {
        "provider": "alpha",
        "model": "m1",
        "policy": "cheap",
        "strategy": "cost",
        "reason": "cheapest: $0.000001",  # 44 bytes / 4 + max_tokens 3 (not the default 256)
        "fallbacks": "beta",
        "candidates": "alpha=1.4e-06;beta=2.8e-06",
        "path": "/v1/chat/completions?a=b",
        "length": "44",  # saved by the upstream rewrite: every attempt starts from it
        "priority_groups": [{"name": "alpha"}, {"name": "beta"}],  # the order walked
    }
    assert entry["request"] == {
        "model": "m1", "max_tokens": 3, "stream": False, "client_request_id": "audit-1"
    }
