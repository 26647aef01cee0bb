"""The translated resources against the real Envoy 1.40: they validate, and they route.

The test runs Envoy on a static bootstrap made from translate() output (ADS references inlined,
see translate_fixtures.py), two loopback HTTP upstreams, a stand-in ext_proc that answers the one
request-headers message as the real one does (cluster header, clear_route_cache, gpu_router
metadata) for the provider named in a test header, and a stand-in access-log service.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import empty_pb2, json_format
from translate_fixtures import provider, routing_config, static_bootstrap, write_bootstrap

from control_plane.policy.model import Credential, RoutingConfig
from control_plane.translate import EdgeSettings, EnvoyResources, translate
from control_plane.translate.routes import FALLBACK_REASON
from gpu_router.processes import EnvoyAdmin, ManagedProcess, envoy_binary, free_port

ALPHA_KEY = "sk-alpha-7f3a9c1e"
BETA_KEY = "beta-key-2d8b41f0"
PICK_HEADER = "x-test-pick"
FAIL_HEADER = "x-test-ext-proc-fail"
FAIL_ONCE_HEADER = "x-test-upstream-fail-once"
"""The stand-in provider answers 503 the first time it sees this header's value."""
CHAT_PATH = "/v1/chat/completions"
ALPHA_PREFIX = "/alpha/v1"
ALPHA_LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
ODD_ID = 'odd "quoted" \\ back\\slashed é 100% ]] %1'
"""A provider id that needs Lua-string and JSON escaping (and would break a Lua gsub replacement)."""
ALIASES = {"llama3-8b": "llama-3.1-8b"}


def envoy_argv(config: Path, *extra: str) -> list[str]:
    return [envoy_binary(), "-c", str(config), "--disable-hot-restart", "-l", "info", *extra]


@dataclass
class Upstream:
    """A loopback HTTP server standing in for a provider; remembers what it was sent."""

    name: str
    server: ThreadingHTTPServer
    received: list[dict] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.server_address[1]


def start_upstream(name: str) -> Upstream:
    upstream: Upstream
    failed_once: set[str] = set()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # health checks
            self._reply(200, b"ok")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            upstream.received.append(
                {
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                }
            )
            token = self.headers.get(FAIL_ONCE_HEADER)
            if token is not None and token not in failed_once:
                failed_once.add(token)
                self._reply(503, b"{}")
                return
            self._reply(200, json.dumps({"served_by": name}).encode())

        def _reply(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    upstream = Upstream(name, ThreadingHTTPServer(("127.0.0.1", 0), Handler))
    threading.Thread(target=upstream.server.serve_forever, daemon=True).start()
    return upstream


@dataclass
class Seen:
    """One ProcessingRequest as the stand-in ext_proc received it."""

    kind: str
    headers: dict[str, str]
    request_metadata: dict


class RoutingProcessor(ep_grpc.ExternalProcessorServicer):
    """Stand-in ext_proc keeping the contract: one answer to the request-headers message, model
    from the x-gpu-router-model header or json_to_metadata's "gpu_router.request", provider from
    PICK_HEADER."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    def Process(
        self, request_iterator: Iterable[ep_pb2.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[ep_pb2.ProcessingResponse]:
        for request in request_iterator:
            headers = {h.key: h.raw_value.decode() for h in request.request_headers.headers.headers}
            fields = request.metadata_context.filter_metadata.get("gpu_router.request")
            body = json_format.MessageToDict(fields) if fields is not None else {}
            self.seen.append(Seen(request.WhichOneof("request"), headers, body))
            if FAIL_HEADER in headers:
                context.abort(grpc.StatusCode.UNAVAILABLE, "stand-in ext_proc told to fail")
            if "body_error" in body:
                yield _error(400, body["body_error"])
                continue
            model = headers.get("x-gpu-router-model", body.get("model"))
            if model is None:
                yield _error(400, "missing model")
                continue
            yield _routed(headers[PICK_HEADER], ALIASES.get(model, model), headers[":path"])


def _routed(pick: str, model: str, path: str) -> ep_pb2.ProcessingResponse:
    response = ep_pb2.ProcessingResponse(
        request_headers=ep_pb2.HeadersResponse(
            response=ep_pb2.CommonResponse(
                header_mutation=ep_pb2.HeaderMutation(
                    set_headers=[
                        base_pb2.HeaderValueOption(
                            header=base_pb2.HeaderValue(
                                key="x-gpu-router-cluster", raw_value=pick.encode()
                            )
                        )
                    ]
                ),
                clear_route_cache=True,
            )
        )
    )
    response.dynamic_metadata.update(
        {"gpu_router": {"provider": pick, "model": model, "reason": "test pick", "path": path}}
    )
    return response


def _error(status: int, message: str) -> ep_pb2.ProcessingResponse:
    body = {"error": {"message": message, "type": "invalid_request_error"}}
    return ep_pb2.ProcessingResponse(
        immediate_response=ep_pb2.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status), body=json.dumps(body).encode()
        )
    )


class AccessLogCollector(als_pb2_grpc.AccessLogServiceServicer):
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


@dataclass
class Edge:
    port: int
    admin: EnvoyAdmin
    upstreams: dict[str, Upstream]
    processor: RoutingProcessor
    access_logs: AccessLogCollector

    def post(
        self,
        headers: dict[str, str],
        body: bytes = b"{}",
        *,
        path: str = CHAT_PATH,
        content_type: str | None = "application/json",
    ) -> tuple[int, dict[str, str], bytes]:
        """POST exactly these headers (http.client adds only host and content-length)."""
        if content_type is not None:
            headers = {"content-type": content_type, **headers}
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            return (
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.read(),
            )
        finally:
            connection.close()

    def ext_proc_messages(self) -> int:
        return self.admin.stats("http.edge.ext_proc.")["http.edge.ext_proc.stream_msgs_sent"]


def grpc_server(port: int) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_insecure_port(f"127.0.0.1:{port}")
    return server


def wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def config_for(upstreams: dict[str, Upstream]) -> RoutingConfig:
    return routing_config(
        provider(
            "alpha",
            f"http://127.0.0.1:{upstreams['alpha'].port}{ALPHA_PREFIX}",
            credential=Credential(env="ALPHA_KEY"),
            model_ids={"llama-3.1-8b": ALPHA_LLAMA, "odd-model": ODD_ID},
        ),
        provider(
            "beta",
            f"http://localhost:{upstreams['beta'].port}",
            health_check_path="/healthz",
            credential=Credential(env="BETA_KEY", header="x-api-key", prefix=""),
            model_ids={"llama-3.1-8b": "llama-3.1-8b"},
        ),
    )


def with_one_retry(resources: EnvoyResources) -> EnvoyResources:
    """The translated resources plus one retry on a 5xx on the ext_proc-pick route (the translator
    has no retry policy yet): shows the upstream rewrite is right on every attempt, although header
    edits of an attempt carry into the next one."""
    routes = {name: copy_of(table) for name, table in resources.routes.items()}
    for table in routes.values():
        picked = table.virtual_hosts[0].routes[0]
        assert picked.name == "ext_proc-pick"
        picked.route.retry_policy.retry_on = "5xx"
        picked.route.retry_policy.num_retries.value = 1
    return dataclasses.replace(resources, routes=routes)


def copy_of(table: route_pb2.RouteConfiguration) -> route_pb2.RouteConfiguration:
    copied = route_pb2.RouteConfiguration()
    copied.CopyFrom(table)
    return copied


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    tmp_path = tmp_path_factory.mktemp("translate-envoy")
    upstreams = {name: start_upstream(name) for name in ("alpha", "beta")}
    processor, access_logs = RoutingProcessor(), AccessLogCollector()
    ext_proc_port, als_port, edge_port, admin_port = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    )
    ext_proc_server, als_server = grpc_server(ext_proc_port), grpc_server(als_port)
    ep_grpc.add_ExternalProcessorServicer_to_server(processor, ext_proc_server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(access_logs, als_server)
    settings = EdgeSettings(edge_port=edge_port, ext_proc_endpoints=(("127.0.0.1", ext_proc_port),))
    resources = with_one_retry(
        translate(config_for(upstreams), settings, {"alpha": ALPHA_KEY, "beta": BETA_KEY})
    )
    config = write_bootstrap(
        static_bootstrap(resources, admin_port=admin_port, xds_port=als_port),
        tmp_path / "envoy.json",
    )
    envoy = ManagedProcess("envoy", envoy_argv(config), tmp_path / "envoy.log")
    admin = EnvoyAdmin(admin_port)
    ext_proc_server.start()
    als_server.start()
    try:
        envoy.start()
        envoy.wait_until(admin.ready, "admin /ready")
        healthy = [f"{n}::127.0.0.1:{u.port}::health_flags::healthy" for n, u in upstreams.items()]
        envoy.wait_until(lambda: all(h in admin.clusters() for h in healthy), "providers healthy")
        yield Edge(edge_port, admin, upstreams, processor, access_logs)
    finally:
        envoy.stop()
        ext_proc_server.stop(grace=None)
        als_server.stop(grace=None)
        for upstream in upstreams.values():
            upstream.server.shutdown()
            upstream.server.server_close()


def chat(model: str, **extra: object) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    ).encode()


def test_translated_config_passes_envoy_validate_mode(tmp_path: Path) -> None:
    config = routing_config(
        provider(
            "local",
            "http://127.0.0.1:8101/v1/",
            credential=Credential(env="K"),
            model_ids={"m": ODD_ID},
        ),
        provider(
            "named", "https://api.example.com", credential=Credential(env="K", header="x-api-key")
        ),
        provider("loopback", "http://localhost:8103"),
        provider("tls_ip", "https://10.0.0.7:8443"),
    )
    resources = translate(config, EdgeSettings(), {"local": "k1", "named": "k2"})
    path = write_bootstrap(
        static_bootstrap(resources, admin_port=free_port(), xds_port=free_port()),
        tmp_path / "envoy.json",
    )
    result = subprocess.run(
        envoy_argv(path, "--mode", "validate"),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alias_becomes_the_providers_id_under_its_path_prefix(edge: Edge) -> None:
    sent = json.dumps(
        {
            "note": 'a "model": "llama3-8b" in a string \\',
            "metadata": {"model": "llama3-8b"},
            "model": "llama3-8b",
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()
    status, headers, body = edge.post({PICK_HEADER: "alpha"}, sent, path=f"{CHAT_PATH}?v=1&x=y")
    assert status == 200, body
    assert headers["x-gpu-router-provider"] == "alpha"
    received = edge.upstreams["alpha"].received[-1]
    assert received["path"] == f"{ALPHA_PREFIX}{CHAT_PATH}?v=1&x=y"
    assert int(received["headers"]["content-length"]) == len(received["body"])
    assert json.loads(received["body"]) == {**json.loads(sent), "model": ALPHA_LLAMA}


def test_canonical_name_becomes_an_id_that_needs_escaping(edge: Edge) -> None:
    status, _, body = edge.post({PICK_HEADER: "alpha"}, chat("odd-model"))
    assert status == 200, body
    received = edge.upstreams["alpha"].received[-1]
    assert json.loads(received["body"])["model"] == ODD_ID
    assert int(received["headers"]["content-length"]) == len(received["body"])


def test_every_top_level_model_member_gets_the_id_whatever_its_escaping(edge: Edge) -> None:
    sent = b'{"model": "x", "model" : "llama\\u0033-8b", "tools": [{"model": "llama3-8b"}]}'
    status, _, body = edge.post({PICK_HEADER: "alpha"}, sent)
    assert status == 200, body
    assert edge.processor.seen[-1].request_metadata == {"model": "llama3-8b"}
    received = edge.upstreams["alpha"].received[-1]["body"]
    assert received == (
        b'{"model": "meta-llama/Llama-3.1-8B-Instruct", '
        b'"model" : "meta-llama/Llama-3.1-8B-Instruct", "tools": [{"model": "llama3-8b"}]}'
    )


def test_a_retried_attempt_is_rewritten_from_the_originals_again(edge: Edge) -> None:
    sent = chat("llama3-8b")
    before = len(edge.upstreams["alpha"].received)
    status, _, body = edge.post(
        {PICK_HEADER: "alpha", FAIL_ONCE_HEADER: "retry-1", "authorization": "Bearer client"},
        sent,
        path=f"{CHAT_PATH}?q=1",
    )
    assert status == 200, body
    attempts = edge.upstreams["alpha"].received[before:]
    assert len(attempts) == 2
    for attempt in attempts:
        assert attempt["path"] == f"{ALPHA_PREFIX}{CHAT_PATH}?q=1"
        assert attempt["headers"]["authorization"] == f"Bearer {ALPHA_KEY}"
        assert int(attempt["headers"]["content-length"]) == len(attempt["body"])
        assert json.loads(attempt["body"]) == {**json.loads(sent), "model": ALPHA_LLAMA}


def test_body_is_untouched_when_the_ids_are_equal(edge: Edge) -> None:
    sent = b'{ "model" :\n "llama-3.1-8b" , "messages": [], "model_note": "x" }'
    status, _, body = edge.post({PICK_HEADER: "beta"}, sent)
    assert status == 200, body
    received = edge.upstreams["beta"].received[-1]
    assert received["body"] == sent
    assert received["path"] == CHAT_PATH


def test_header_model_routes_and_rewrites_the_bodys_model(edge: Edge) -> None:
    status, _, body = edge.post(
        {PICK_HEADER: "alpha", "x-gpu-router-model": "llama3-8b"}, chat("whatever-the-body-says")
    )
    assert status == 200, body
    assert json.loads(edge.upstreams["alpha"].received[-1]["body"])["model"] == ALPHA_LLAMA


def test_a_body_over_one_mib_is_rewritten_without_413(edge: Edge) -> None:
    sent = chat("llama3-8b", prompt="x" * (3 * 1024 * 1024))
    status, _, body = edge.post({PICK_HEADER: "alpha"}, sent)
    assert status == 200, body
    received = edge.upstreams["alpha"].received[-1]
    assert int(received["headers"]["content-length"]) == len(received["body"])
    assert json.loads(received["body"]) == {**json.loads(sent), "model": ALPHA_LLAMA}


def test_body_fields_reach_ext_proc_as_request_metadata(edge: Edge) -> None:
    sent = chat("llama3-8b", max_tokens=64, max_completion_tokens=32, stream=True)
    status, _, _ = edge.post({PICK_HEADER: "beta"}, sent)
    assert status == 200
    assert edge.processor.seen[-1].request_metadata == {
        "model": "llama3-8b",
        "max_tokens": 64.0,
        "max_completion_tokens": 32.0,
        "stream": True,
    }


@pytest.mark.parametrize(
    ("content_type", "body", "metadata"),
    [
        ("application/json", b'{"model": "llama3-8b", "max_tokens": 7}', None),
        ("application/json; charset=utf-8", b'{"model": "llama3-8b"}', None),
        ("Application/JSON", b'{"model": "llama3-8b"}', None),
        (None, b'{"model": "llama3-8b"}', None),
        ("application/json", b'{"model": ', {"body_error": "invalid JSON"}),
        ("application/json", b'["model", "llama3-8b"]', {}),
        ("application/json", b'"llama3-8b"', {}),
        ("application/json", b"", {}),
        ("application/json", b'{"messages": []}', {}),
        ("text/plain", b'{"model": "llama3-8b"}', {"body_error": "invalid JSON"}),
        ("application/x-www-form-urlencoded", b"model=llama3-8b", {"body_error": "invalid JSON"}),
    ],
)
def test_what_json_to_metadata_hands_ext_proc(
    edge: Edge, content_type: str | None, body: bytes, metadata: dict | None
) -> None:
    before = len(edge.processor.seen)
    status, _, answer = edge.post({PICK_HEADER: "beta"}, body, content_type=content_type)
    (seen,) = edge.processor.seen[before:]
    if metadata is None:
        assert status == 200, answer
        assert seen.request_metadata["model"] == "llama3-8b"
    else:
        assert seen.request_metadata == metadata
        assert status == 400
        assert json.loads(answer)["error"]["message"] in ("invalid JSON", "missing model")


def test_ext_proc_gets_exactly_one_message_per_request(edge: Edge) -> None:
    before_seen, before_sent = len(edge.processor.seen), edge.ext_proc_messages()
    for pick, body in (("alpha", chat("llama3-8b", prompt="y" * 200_000)), ("beta", b"[")):
        edge.post({PICK_HEADER: pick}, body)
    assert edge.ext_proc_messages() - before_sent == 2
    assert [s.kind for s in edge.processor.seen[before_seen:]] == ["request_headers"] * 2


def test_ext_proc_pick_routes_to_that_provider_with_its_credential_only(edge: Edge) -> None:
    status, headers, body = edge.post(
        {
            PICK_HEADER: "beta",
            "x-gpu-router-cluster": "alpha",
            "authorization": "Bearer client-key",
        },
        chat("llama-3.1-8b"),
    )
    assert status == 200, body
    assert json.loads(body) == {"served_by": "beta"}
    assert headers["x-gpu-router-provider"] == "beta"
    assert headers["x-gpu-router-reason"] == "test pick"
    sent = edge.upstreams["beta"].received[-1]["headers"]
    assert sent["x-api-key"] == BETA_KEY
    assert "authorization" not in sent
    assert sent["host"] == "localhost"
    assert "x-gpu-router-cluster" not in sent


def test_bearer_prefix_is_part_of_the_injected_value_and_replaces_the_clients(edge: Edge) -> None:
    status, headers, _ = edge.post(
        {PICK_HEADER: "alpha", "authorization": "Bearer client-key", "x-api-key": "client"},
        chat("llama-3.1-8b"),
    )
    assert status == 200
    assert headers["x-gpu-router-provider"] == "alpha"
    sent = edge.upstreams["alpha"].received[-1]["headers"]
    assert sent["authorization"] == f"Bearer {ALPHA_KEY}"
    assert "x-api-key" not in sent


def test_ext_proc_failure_falls_back_still_fitted_to_the_provider(edge: Edge) -> None:
    status, headers, body = edge.post(
        {FAIL_HEADER: "1", "x-gpu-router-cluster": "alpha"}, chat("llama-3.1-8b")
    )
    assert status == 200, body
    served_by = json.loads(body)["served_by"]
    assert headers["x-gpu-router-provider"] == served_by
    assert headers["x-gpu-router-reason"] == FALLBACK_REASON
    received = edge.upstreams[served_by].received[-1]
    expected = {
        "alpha": ("authorization", f"Bearer {ALPHA_KEY}", ALPHA_PREFIX, ALPHA_LLAMA),
        "beta": ("x-api-key", BETA_KEY, "", "llama-3.1-8b"),
    }
    header, value, prefix, model = expected[served_by]
    assert received["headers"][header] == value
    assert received["path"] == prefix + CHAT_PATH
    assert json.loads(received["body"])["model"] == model


def test_access_log_carries_ext_proc_metadata(edge: Edge) -> None:
    status, _, _ = edge.post({PICK_HEADER: "beta", "x-gpu-router-model": "llama-3.1-8b"})
    assert status == 200

    def logged() -> list[als_pb2.StreamAccessLogsMessage]:
        return [
            entry
            for name, entry in list(edge.access_logs.entries)
            if name == "gpu-router.edge"
            and entry.request.request_headers.get("x-gpu-router-model") == "llama-3.1-8b"
        ]

    wait_for(logged, "the access log entry")
    entry = logged()[-1]
    metadata = entry.common_properties.metadata.filter_metadata["gpu_router"]
    assert metadata["reason"] == "test pick"
    assert metadata["provider"] == "beta"
    assert entry.common_properties.upstream_cluster == "beta"


def test_config_dump_redacts_provider_keys(edge: Edge) -> None:
    dump = json.dumps(edge.admin.config_dump())
    assert ALPHA_KEY not in dump and BETA_KEY not in dump
    secrets = [
        config
        for config in edge.admin.config_dump()["configs"]
        if config["@type"].endswith("SecretsConfigDump")
    ]
    static = {s["name"]: s["secret"] for s in secrets[0]["static_secrets"]}
    assert static["gpu-router.credential.alpha"]["generic_secret"]["secret"] == {
        "inline_string": "[redacted]"
    }
