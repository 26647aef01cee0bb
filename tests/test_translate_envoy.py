"""The translated resources against the real Envoy 1.40: they validate, and they route.

The test runs Envoy on a static bootstrap made from translate() output (ADS references inlined,
see translate_fixtures.py), two loopback HTTP upstreams, a scaffold ext_proc that picks the
provider named in a test header, and a scaffold access-log service.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import empty_pb2, struct_pb2
from translate_fixtures import provider, routing_config, static_bootstrap, write_bootstrap

from control_plane.policy.model import Credential
from control_plane.translate import EdgeSettings, translate
from control_plane.translate.routes import FALLBACK_REASON
from gpu_router.processes import EnvoyAdmin, ManagedProcess, envoy_binary, free_port

ALPHA_KEY = "sk-alpha-7f3a9c1e"
BETA_KEY = "beta-key-2d8b41f0"
MAX_GRPC_MESSAGE = 64 * 1024 * 1024
PICK_HEADER = "x-test-pick"
WANT_BODY_HEADER = "x-test-want-body"
FAIL_HEADER = "x-test-ext-proc-fail"


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

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # health checks
            self._reply(200, b"ok")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            upstream.received.append(
                {
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body_length": len(body),
                }
            )
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


class PickingProcessor(ep_grpc.ExternalProcessorServicer):
    """Scaffold ext_proc: routes to the provider named in PICK_HEADER, as the real one would."""

    def __init__(self) -> None:
        self.body_sizes: list[int] = []

    def Process(
        self, request_iterator: Iterable[ep_pb2.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[ep_pb2.ProcessingResponse]:
        for request in request_iterator:
            if request.HasField("request_body"):
                self.body_sizes.append(len(request.request_body.body))
                yield ep_pb2.ProcessingResponse(request_body=ep_pb2.BodyResponse())
                continue
            headers = {h.key: h.raw_value.decode() for h in request.request_headers.headers.headers}
            if FAIL_HEADER in headers:
                context.abort(grpc.StatusCode.UNAVAILABLE, "scaffold ext_proc told to fail")
            pick = headers[PICK_HEADER]
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
                ),
                dynamic_metadata=struct_pb2.Struct(),
            )
            response.dynamic_metadata.update(
                {"gpu_router": {"provider": pick, "reason": "test pick"}}
            )
            if WANT_BODY_HEADER not in headers:
                response.mode_override.CopyFrom(
                    processing_mode_pb2.ProcessingMode(
                        request_body_mode=processing_mode_pb2.ProcessingMode.NONE
                    )
                )
            yield response


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
    processor: PickingProcessor
    access_logs: AccessLogCollector

    def post(
        self, headers: dict[str, str], body: bytes = b"{}"
    ) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/chat/completions",
            data=body,
            method="POST",
            headers={"content-type": "application/json", **headers},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return (
                    response.status,
                    {k.lower(): v for k, v in response.headers.items()},
                    response.read(),
                )
        except urllib.error.HTTPError as error:
            return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def grpc_server(port: int) -> grpc.Server:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
        ],
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    return server


def wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def config_for(upstreams: dict[str, Upstream]):
    return routing_config(
        provider(
            "alpha",
            f"http://127.0.0.1:{upstreams['alpha'].port}",
            credential=Credential(env="ALPHA_KEY"),
        ),
        provider(
            "beta",
            f"http://localhost:{upstreams['beta'].port}",
            health_check_path="/healthz",
            credential=Credential(env="BETA_KEY", header="x-api-key", prefix=""),
        ),
    )


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    tmp_path = tmp_path_factory.mktemp("translate-envoy")
    upstreams = {name: start_upstream(name) for name in ("alpha", "beta")}
    processor, access_logs = PickingProcessor(), AccessLogCollector()
    ext_proc_port, als_port, edge_port, admin_port = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    )
    ext_proc_server, als_server = grpc_server(ext_proc_port), grpc_server(als_port)
    ep_grpc.add_ExternalProcessorServicer_to_server(processor, ext_proc_server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(access_logs, als_server)
    settings = EdgeSettings(edge_port=edge_port, ext_proc_port=ext_proc_port)
    resources = translate(config_for(upstreams), settings, {"alpha": ALPHA_KEY, "beta": BETA_KEY})
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


def test_translated_config_passes_envoy_validate_mode(tmp_path: Path) -> None:
    config = routing_config(
        provider("local", "http://127.0.0.1:8101", credential=Credential(env="K")),
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


def test_ext_proc_pick_routes_to_that_provider_with_its_credential(edge: Edge) -> None:
    status, headers, body = edge.post(
        {PICK_HEADER: "beta", "x-gpu-router-cluster": "alpha", "authorization": "Bearer client-key"}
    )
    assert status == 200, body
    assert json.loads(body) == {"served_by": "beta"}
    assert headers["x-gpu-router-provider"] == "beta"
    assert headers["x-gpu-router-reason"] == "test pick"
    sent = edge.upstreams["beta"].received[-1]["headers"]
    assert sent["x-api-key"] == BETA_KEY
    assert sent["host"] == "localhost"
    assert "x-gpu-router-cluster" not in sent


def test_bearer_prefix_is_part_of_the_injected_value_and_replaces_the_clients(edge: Edge) -> None:
    status, headers, _ = edge.post({PICK_HEADER: "alpha", "authorization": "Bearer client-key"})
    assert status == 200
    assert headers["x-gpu-router-provider"] == "alpha"
    assert edge.upstreams["alpha"].received[-1]["headers"]["authorization"] == f"Bearer {ALPHA_KEY}"


def test_body_goes_to_ext_proc_only_when_it_keeps_buffered_mode(edge: Edge) -> None:
    prompt = b'{"model": "m", "prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    before = len(edge.processor.body_sizes)
    status, _, _ = edge.post({PICK_HEADER: "alpha"}, prompt)
    assert status == 200
    assert len(edge.processor.body_sizes) == before
    status, _, _ = edge.post({PICK_HEADER: "alpha", WANT_BODY_HEADER: "1"}, prompt)
    assert status == 200
    assert edge.processor.body_sizes[before:] == [len(prompt)]
    assert edge.upstreams["alpha"].received[-1]["body_length"] == len(prompt)


def test_ext_proc_failure_falls_back_and_client_cluster_header_is_ignored(edge: Edge) -> None:
    status, headers, body = edge.post({FAIL_HEADER: "1", "x-gpu-router-cluster": "alpha"})
    assert status == 200, body
    served_by = json.loads(body)["served_by"]
    assert headers["x-gpu-router-provider"] == served_by
    assert headers["x-gpu-router-reason"] == FALLBACK_REASON
    sent = edge.upstreams[served_by].received[-1]["headers"]
    expected = {"alpha": ("authorization", f"Bearer {ALPHA_KEY}"), "beta": ("x-api-key", BETA_KEY)}
    header, value = expected[served_by]
    assert sent[header] == value


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
