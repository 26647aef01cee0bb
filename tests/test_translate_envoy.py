"""The translated resources against the real Envoy 1.40: they validate, route and fail over.

The test runs Envoy on a static bootstrap made from translate() output (ADS references inlined,
see translate_fixtures.py), two loopback HTTP upstreams (alpha, beta) and a provider where nothing
listens (gamma), a stand-in ext_proc that answers the one request-headers message as the real one
does (route header "<policy>/<order>", clear_route_cache, gpu_router metadata) for the order named
in a test header, and a stand-in access-log service. Each upstream misbehaves on request, per the
x-test-mode-<provider> header: 503, 429 (with Retry-After), hang, reset, SSE streams, or a scripted
response sent chunk by chunk in lockstep with the client's reads.
"""

from __future__ import annotations

import dataclasses
import http.client
import itertools
import json
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.type.v3 import http_status_pb2
from envoy_fixtures import AccessLogCollector, envoy_argv, ext_proc_grpc_server, grpc_server
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from polling import eventually
from translate_fixtures import provider, routing_config, static_bootstrap, write_bootstrap
from usage_fixtures import make_record

from control_plane.policy.model import Credential, Match, Model, Policy, RoutingConfig
from control_plane.telemetry.client_request import ext_proc_latency_us
from control_plane.translate import EdgeSettings, translate
from control_plane.translate.clusters import EXT_PROC_HEALTH_SERVICE
from control_plane.translate.fallback_routes import FALLBACK_REASON
from control_plane.translate.names import ORDER_METADATA_KEY
from control_plane.translate.routes import route_configuration, route_header_value
from control_plane.usage.normalise import normalise
from gpu_router.processes import EnvoyAdmin, ManagedProcess, free_port

ALPHA_KEY = "sk-alpha-7f3a9c1e"
BETA_KEY = "beta-key-2d8b41f0"
PICK_HEADER = "x-test-pick"
"""The ranked order the stand-in ext_proc picks, e.g. "alpha,beta"."""
FAIL_HEADER = "x-test-ext-proc-fail"
PER_TRY_TIMEOUT_MS = 1000
FALLBACK_WEIGHTS = {"gamma": 100, "alpha": 50, "beta": 10}
"""The fallback route's order: gamma (nothing listens), alpha, beta."""
CHAT_PATH = "/v1/chat/completions"
ALPHA_PREFIX = "/alpha/v1"
ALPHA_LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
ODD_ID = 'odd "quoted" \\ back\\slashed é 100% ]] %1'
"""A provider id that needs Lua-string and JSON escaping (and would break a Lua gsub replacement)."""
ALIASES = {"llama3-8b": "llama-3.1-8b"}


@dataclass
class Script:
    """A response an upstream sends chunk by chunk (chunked encoding), each chunk after the
    client has read the one before (`next_chunk` released): Envoy sees every chunk apart, and
    the client can only finish if Envoy passed each chunk on before the upstream sent the next."""

    content_type: str
    chunks: list[bytes]
    status: int = 200
    next_chunk: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))


@dataclass
class Upstream:
    """A loopback HTTP server standing in for a provider; remembers what it was sent."""

    name: str
    server: ThreadingHTTPServer
    received: list[dict] = field(default_factory=list)
    scripts: dict[str, Script] = field(default_factory=dict)
    """Responses for x-test-mode-<name>: "script:<key>"."""

    @property
    def port(self) -> int:
        return self.server.server_address[1]


def start_upstream(name: str) -> Upstream:
    """Answers 200 {"served_by": name}, unless x-test-mode-<name> says: "503"; "429" (with
    Retry-After 7); "hang" (3 s before anything, beyond the per-try timeout); "reset" (closes the
    connection without a byte); "sse" (an event stream of 3 chunks); "sse-slow" (the same over
    1.5 s, beyond the per-try timeout); "sse-midfail" (headers and one chunk, then a reset);
    "script:<key>" (the Script registered under that key)."""
    upstream: Upstream

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

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
            mode = self.headers.get(f"x-test-mode-{name}", "ok")
            if mode == "503":
                self._reply(503, b"{}")
            elif mode == "429":
                self._reply(429, b"{}", {"retry-after": "7"})
            elif mode == "hang":
                time.sleep(3)
                self._reply(200, json.dumps({"served_by": name, "late": True}).encode())
            elif mode == "reset":
                self._reset()
            elif mode.startswith("sse"):
                self._stream(mode)
            elif mode.startswith("script:"):
                self._script(upstream.scripts[mode.removeprefix("script:")])
            else:
                self._reply(200, json.dumps({"served_by": name}).encode())

        def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _stream(self, mode: str) -> None:
            """Chunked, so a reset mid-stream is an error, not the end of the body."""
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for index in range(3):
                event = f"data: {name}-{index}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                if mode == "sse-midfail":
                    time.sleep(0.2)
                    self._reset()
                    return
                if mode == "sse-slow":
                    time.sleep(0.75)
            self.wfile.write(b"0\r\n\r\n")

        def _script(self, script: Script) -> None:
            self.send_response(script.status)
            self.send_header("content-type", script.content_type)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for index, chunk in enumerate(script.chunks):
                if index > 0 and not script.next_chunk.acquire(timeout=10):
                    self._reset()  # the client never got the previous chunk
                    return
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")

        def _reset(self) -> None:
            """A TCP reset: linger 0, then close."""
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            self.close_connection = True

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
    from the x-gpu-router-model header or the request-fields filter's "gpu_router.request", the ranked
    order of providers from PICK_HEADER."""

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
            model = headers.get("x-gpu-router-model", body.get("model"))
            if model is None:
                yield _error(400, "missing model")
                continue
            yield _routed(headers[PICK_HEADER], ALIASES.get(model, model), headers[":path"])


def _routed(order: str, model: str, path: str) -> ep_pb2.ProcessingResponse:
    providers = order.split(",")
    route = route_header_value("default", model, len(providers))
    response = ep_pb2.ProcessingResponse(
        request_headers=ep_pb2.HeadersResponse(
            response=ep_pb2.CommonResponse(
                header_mutation=ep_pb2.HeaderMutation(
                    set_headers=[
                        base_pb2.HeaderValueOption(
                            header=base_pb2.HeaderValue(
                                key="x-gpu-router-route", raw_value=route.encode()
                            )
                        )
                    ]
                ),
                clear_route_cache=True,
            )
        )
    )
    winner, _, fallbacks = order.partition(",")
    response.dynamic_metadata.update(
        {
            "gpu_router": {
                "provider": winner,
                "fallbacks": fallbacks,
                "model": model,
                "reason": "test pick",
                "path": path,
                ORDER_METADATA_KEY: [{"name": name} for name in providers],
            }
        }
    )
    return response


def _error(status: int, message: str) -> ep_pb2.ProcessingResponse:
    body = {"error": {"message": message, "type": "invalid_request_error"}}
    return ep_pb2.ProcessingResponse(
        immediate_response=ep_pb2.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status), body=json.dumps(body).encode()
        )
    )


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

    def stream(self, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes, str]:
        """POST a streaming chat request: status, headers, the body bytes that arrived, and how
        the body ended ("complete", or the error that cut it)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(
                "POST",
                CHAT_PATH,
                body=chat("llama3-8b", stream=True),
                headers={"content-type": "application/json", **headers},
            )
            response = connection.getresponse()
            received, ending = b"", "complete"
            try:
                while chunk := response.read1(65536):
                    received += chunk
            except (http.client.HTTPException, OSError) as error:
                ending = type(error).__name__
            return (
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                received,
                ending,
            )
        finally:
            connection.close()

    def lockstep(self, script: Script, hang_up_after: int | None = None) -> tuple[int, bytes, str]:
        """Has beta answer with `script`, reading each chunk before letting beta send the next:
        (status, the body the client received, the request's x-request-id). With
        `hang_up_after`, the client closes its connection once it has that many chunks, before
        beta may send the rest."""
        key, rid = uuid.uuid4().hex, request_id()
        self.upstreams["beta"].scripts[key] = script
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(
                "POST",
                CHAT_PATH,
                body=chat("llama3-8b"),
                headers={
                    "content-type": "application/json",
                    PICK_HEADER: "beta",
                    "x-test-mode-beta": f"script:{key}",
                    "x-request-id": rid,
                },
            )
            response = connection.getresponse()
            received, expected = b"", 0
            wanted = script.chunks[:hang_up_after]
            for index, chunk in enumerate(wanted, 1):
                expected += len(chunk)
                while len(received) < expected:
                    more = response.read1(65536)
                    assert more, f"the body ended after {len(received)} of {expected} bytes"
                    received += more
                if hang_up_after is None or index < len(wanted):
                    script.next_chunk.release()
            if hang_up_after is None:
                received += response.read()
            return response.status, received, rid
        finally:
            connection.close()
            if hang_up_after is not None:
                script.next_chunk.release()  # beta sends on into a stream Envoy has reset

    def usage_logged(self, request_id: str) -> dict | None:
        """The edge log's "gpu_router.usage" metadata for the request (None: not there)."""
        eventually(lambda: self.logged("gpu-router.edge", request_id), "the edge log")
        (entry,) = self.logged("gpu-router.edge", request_id)
        found = entry.common_properties.metadata.filter_metadata.get("gpu_router.usage")
        return None if found is None else json_format.MessageToDict(found)

    def logged(self, log_name: str, request_id: str) -> list[als_pb2.HTTPAccessLogEntry]:
        """Entries of `log_name` for the request the client sent with this x-request-id. The
        edge replaces that id with its own and logs the client's as "client_request_id"; the
        edge's joins the request's attempts."""
        entries = list(self.access_logs.entries)
        edge_ids = {
            entry.request.request_id
            for name, entry in entries
            if name == "gpu-router.edge" and client_request_id(entry) == request_id
        }
        return [
            entry for name, entry in entries
            if name == log_name and entry.request.request_id in edge_ids
        ]

    def ext_proc_messages(self) -> int:
        return self.admin.stats("http.edge.ext_proc.")["http.edge.ext_proc.stream_msgs_sent"]


def client_request_id(entry: als_pb2.HTTPAccessLogEntry) -> str | None:
    fields = entry.common_properties.metadata.filter_metadata.get("gpu_router.request")
    value = None if fields is None else fields.fields.get("client_request_id")
    return None if value is None else value.string_value


def config_for(upstreams: dict[str, Upstream], refused_port: int) -> RoutingConfig:
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
        provider(
            "gamma", f"http://127.0.0.1:{refused_port}", model_ids={"llama-3.1-8b": "gamma-8b"}
        ),
        policies=(
            # Matches no request the tests send (each sends these headers with a value): its
            # headers are the stand-in ext_proc's instructions, and the
            # edge sends ext_proc only the headers a policy matches on (and the decision's).
            Policy(name="stand-in", match=Match(headers=((PICK_HEADER, ""), (FAIL_HEADER, "")))),
            Policy(name="default", max_fallbacks=2, per_try_timeout_ms=PER_TRY_TIMEOUT_MS),
        ),
        models=(*(Model(name=name, aliases=(alias,)) for alias, name in ALIASES.items()),
                Model(name="odd-model")),
    )


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    tmp_path = tmp_path_factory.mktemp("translate-envoy")
    upstreams = {name: start_upstream(name) for name in ("alpha", "beta")}
    processor, access_logs = RoutingProcessor(), AccessLogCollector()
    ext_proc_port, als_port, edge_port, admin_port, refused_port = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    )
    ext_proc_server, als_server = ext_proc_grpc_server(ext_proc_port), grpc_server(als_port)
    ep_grpc.add_ExternalProcessorServicer_to_server(processor, ext_proc_server)
    # Envoy health-checks the ext_proc cluster (gRPC health) and sends nothing to a replica
    # that does not answer SERVING.
    serving = health.HealthServicer()
    serving.set(EXT_PROC_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(serving, ext_proc_server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(access_logs, als_server)
    settings = EdgeSettings(edge_port=edge_port, ext_proc_endpoints=(("127.0.0.1", ext_proc_port),))
    routing = config_for(upstreams, refused_port)
    # The fallback route as fleet weights shape it (the control plane's rollout does this).
    fallback_routes = route_configuration(routing, settings, FALLBACK_WEIGHTS)
    resources = dataclasses.replace(
        translate(routing, settings, {"alpha": ALPHA_KEY, "beta": BETA_KEY}),
        routes=MappingProxyType({fallback_routes.name: fallback_routes}),
    )
    config = write_bootstrap(
        static_bootstrap(resources, admin_port=admin_port, xds_port=als_port),
        tmp_path / "envoy.pb",
    )
    envoy = ManagedProcess("envoy", envoy_argv(config), tmp_path / "envoy.log")
    admin = EnvoyAdmin(admin_port)
    ext_proc_server.start()
    als_server.start()
    try:
        envoy.start()
        envoy.wait_until(admin.ready, "admin /ready")
        healthy = [f"{n}::127.0.0.1:{u.port}::health_flags::healthy" for n, u in upstreams.items()]
        healthy.append(f"gpu-router.ext_proc::127.0.0.1:{ext_proc_port}::health_flags::healthy")
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
        tmp_path / "envoy.pb",
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


def test_an_escaped_model_member_is_read_and_rewritten(edge: Edge) -> None:
    sent = b'{"mod\\u0065l" : "llama\\u0033-8b", "tools": [{"model": "llama3-8b"}]}'
    status, _, body = edge.post({PICK_HEADER: "alpha"}, sent)
    assert status == 200, body
    assert edge.processor.seen[-1].request_metadata == {"model": "llama3-8b"}
    received = edge.upstreams["alpha"].received[-1]["body"]
    assert received == (
        b'{"mod\\u0065l" : "meta-llama/Llama-3.1-8B-Instruct", "tools": [{"model": "llama3-8b"}]}'
    )


UNREADABLE_BODIES = {
    "duplicate model": b'{"model": "llama3-8b", "model": "gpt-expensive"}',
    "escaped duplicate": b'{"model": "llama3-8b", "mod\\u0065l": "gpt-expensive"}',
    "escaped slash duplicate": b'{"model": "llama3-8b", "mo\\u0064el": "x", "messages": []}',
    "case variant": b'{"model": "llama3-8b", "Model": "gpt-expensive"}',
    "case variant alone": b'{"MODEL": "gpt-expensive", "messages": []}',
    "escaped case variant": b'{"model": "llama3-8b", "\\u004dodel": "gpt-expensive"}',
    "duplicate other key": b'{"model": "llama3-8b", "stream": false, "stream": true}',
    "model not a string": b'{"model": ["llama3-8b"]}',
    "concatenated objects": b'{"model": "llama3-8b"}{"model": "gpt-expensive"}',
    "trailing garbage": b'{"model": "llama3-8b"} x',
    "extra closing brace": b'{"model": "x"}}',
    "mismatched brackets": b'{"model": "llama3-8b", "messages": [{"a": 1]}, "x": "y"}',
    "unclosed object": b'{"model": ',
    "unclosed string": b'{"model": "llama3-8b',
    "array": b'["model", "llama3-8b"]',
    "bare string": b'"llama3-8b"',
    "nul byte": b'{"model": "llama3-8b", "messages": "a\x00b"}',
    "nul before a key": b'{"model": "llama3-8b",\x00 "model": "x"}',
    "control byte": b'{"model": "llama3-8b\x01"}',
    "bad escape": b'{"model": "llama3-8b", "p": "\\x41"}',
    "short unicode escape": b'{"model": "llama3-8b", "p": "\\u41"}',
    "escape at the end": b'{"model": "llama3-8b", "p": "\\',
    "lone high surrogate": b'{"model": "llama3-8b\\ud800"}',
    "lone low surrogate": b'{"model": "llama3-8b", "p": "\\udc00"}',
    "non-UTF-8 in a string": b'{"model": "llama3-8b", "p": "\xff"}',
    "lead byte eats a quote": b'{"model": "llama3-8b", "p": "\xe0", "model": "x"}',
    "overlong quote": b'{"model": "llama3-8b", "p": "\xc0\xa2"}',
    "CESU surrogate bytes": b'{"model": "llama3-8b", "p": "\xed\xa0\x80"}',
    "non-UTF-8 in a key": b'{"model": "llama3-8b", "\xff": 1}',
    "missing comma": b'{"model": "llama3-8b" "x": 1}',
    "missing colon": b'{"model" "llama3-8b"}',
    "bare word": b'{"model": "llama3-8b", "x": nope}',
    "leading zero": b'{"model": "llama3-8b", "max_tokens": 016}',
    "single quotes": b"{'model': 'llama3-8b'}",
    "escaped backslash then a bad escape": b'{"model": "llama3-8b", "p": "\\\\\\d"}',
    "reversed surrogate pair": b'{"model": "llama3-8b", "p": "\\udc00\\ud800"}',
    "high surrogate then a letter": b'{"model": "llama3-8b", "p": "\\ud83dx"}',
}


def test_the_refusal_says_why(edge: Edge) -> None:
    status, _, answer = edge.post({PICK_HEADER: "alpha"}, UNREADABLE_BODIES["escaped duplicate"])
    assert status == 400
    assert json.loads(answer)["error"]["message"] == (
        'the request body cannot be read one way only: it has more than one member named '
        '"model"; send one JSON object (UTF-8) with a single "model"'
    )
    status, _, answer = edge.post({PICK_HEADER: "alpha"}, UNREADABLE_BODIES["case variant alone"])
    assert status == 400
    assert 'a member "MODEL" that a case-insensitive provider reads as "model"' in (
        json.loads(answer)["error"]["message"]
    )


@pytest.mark.parametrize("body", UNREADABLE_BODIES.values(), ids=UNREADABLE_BODIES.keys())
def test_a_body_parsers_could_read_differently_is_refused_at_the_edge(
    edge: Edge, body: bytes
) -> None:
    before_seen, before = len(edge.processor.seen), counts(edge)
    status, headers, answer = edge.post({PICK_HEADER: "alpha"}, body)
    assert status == 400, answer
    assert headers["content-type"] == "application/json"
    error = json.loads(answer)["error"]
    assert error["message"].startswith(headers["x-gpu-router-reason"][:-1])
    assert error["code"] == "invalid_json"
    assert error["message"].startswith("the request body cannot be read one way only: ")
    assert edge.processor.seen[before_seen:] == []
    assert since(edge, before) == {"alpha": [], "beta": []}


READABLE_BODIES = {
    "surrogate pair": (b'{"model": "llama3-8b", "p": "\\ud83d\\ude00"}', "llama3-8b"),
    "UTF-8 text": ('{"model": "llama3-8b", "p": "模型 é 😀"}'.encode(), "llama3-8b"),
    "escapes": (b'{"model": "llama3-8b", "p": "\\"\\\\\\/\\b\\f\\n\\r\\t"}', "llama3-8b"),
    "escaped backslash then u": (b'{"model": "llama3-8b", "p": "\\\\u12"}', "llama3-8b"),
    "numbers": (b'{"model": "llama3-8b", "max_tokens": 1.5e2, "t": -0.25, "n": null}',
                "llama3-8b"),
    "whitespace": (b' \r\n\t{ "model" : "llama3-8b" }\n ', "llama3-8b"),
    "nested brackets in strings": (b'{"model": "llama3-8b", "m": [{"c": "]}{[\\""}]}',
                                   "llama3-8b"),
    "model-like keys": (b'{"model": "llama3-8b", "models": 1, "model_x": 2}', "llama3-8b"),
    "regex escapes": (b'{"model": "llama3-8b", "p": "\\\\d+\\\\s \\\\ud800"}', "llama3-8b"),
    "emoji pairs": (b'{"model": "llama\\u0033-8b", "p": "\\ud83d\\ude00\\uD83D\\uDE01"}',
                    "llama3-8b"),
}


@pytest.mark.parametrize(("body", "model"), READABLE_BODIES.values(), ids=READABLE_BODIES.keys())
def test_a_body_read_one_way_is_routed_by_its_model(edge: Edge, body: bytes, model: str) -> None:
    status, _, answer = edge.post({PICK_HEADER: "alpha"}, body)
    assert status == 200, answer
    assert edge.processor.seen[-1].request_metadata["model"] == model
    received = json.loads(edge.upstreams["alpha"].received[-1]["body"])
    assert received == {**json.loads(body), "model": ALPHA_LLAMA}


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/vnd.foo+json", "application/x-www-form-urlencoded"]
)
def test_an_inference_body_of_another_type_is_refused_with_415(
    edge: Edge, content_type: str
) -> None:
    before_seen, before = len(edge.processor.seen), counts(edge)
    status, _, answer = edge.post(
        {PICK_HEADER: "alpha", "x-gpu-router-model": "llama3-8b"},
        b'{"model": "gpt-expensive"}',
        content_type=content_type,
    )
    assert status == 415, answer
    assert json.loads(answer)["error"]["code"] == "unsupported_media_type"
    assert edge.processor.seen[before_seen:] == []
    assert since(edge, before) == {"alpha": [], "beta": []}


def test_a_header_model_is_added_to_a_body_without_one(edge: Edge) -> None:
    for sent in (b'{"messages": []}', b" { } "):
        status, _, body = edge.post({PICK_HEADER: "alpha", "x-gpu-router-model": "llama3-8b"}, sent)
        assert status == 200, body
        received = json.loads(edge.upstreams["alpha"].received[-1]["body"])
        assert received == {**json.loads(sent), "model": ALPHA_LLAMA}


def test_the_edge_makes_its_own_request_id_and_logs_the_clients(edge: Edge) -> None:
    rid = request_id()
    status, _, _ = edge.post({PICK_HEADER: "beta", "x-request-id": rid}, chat("llama3-8b"))
    assert status == 200
    sent = edge.upstreams["beta"].received[-1]["headers"]
    assert sent["x-request-id"] != rid
    assert "x-gpu-router-client-request-id" not in sent
    eventually(lambda: edge.logged("gpu-router.edge", rid), "the edge log")
    (entry,) = edge.logged("gpu-router.edge", rid)
    assert entry.request.request_id == sent["x-request-id"]


def test_ext_proc_gets_only_the_headers_it_reads(edge: Edge) -> None:
    """The decision's headers and those a policy matches on; not the client's others, nor its
    key when no clients are declared."""
    sdk = {"user-agent": "OpenAI/Python 1.54.0", "x-stainless-lang": "python",
           "authorization": "Bearer sk-client", "x-api-key": "sk-client", "accept": "*/*",
           "x-gpu-router-strategy": "cost", "x-gpu-router-model": "llama3-8b"}
    status, _, _ = edge.post({PICK_HEADER: "beta", **sdk}, chat("llama3-8b"))
    assert status == 200
    assert sorted(edge.processor.seen[-1].headers) == sorted([
        ":method", ":path", "content-length", PICK_HEADER, "x-gpu-router-model",
        "x-gpu-router-strategy"])


def test_a_client_copy_header_without_an_id_is_not_kept(edge: Edge) -> None:
    status, _, _ = edge.post(
        {PICK_HEADER: "beta", "x-gpu-router-client-request-id": "forged"}, chat("llama3-8b")
    )
    assert status == 200
    assert "client_request_id" not in edge.processor.seen[-1].request_metadata


def test_client_headers_that_choose_accounts_or_break_accounting_never_reach_a_provider(
    edge: Edge,
) -> None:
    client = {
        "openai-organization": "org-other",
        "openai-project": "proj-other",
        "openai-beta": "assistants=v2",
        "anthropic-beta": "context-1m",
        "cookie": "session=1",
        "forwarded": "for=1.2.3.4",
        "x-forwarded-for": "1.2.3.4",
        "x-forwarded-host": "evil.example",
        "x-real-ip": "1.2.3.4",
        "accept-encoding": "gzip, br",
        "x-envoy-upstream-rq-timeout-ms": "1",
        "x-envoy-max-retries": "50",
        "user-agent": "kept/1.0",
    }
    status, _, body = edge.post(
        {PICK_HEADER: "alpha,beta", "x-test-mode-alpha": "503", **client}, chat("llama3-8b")
    )
    assert status == 200, body
    for name in ("alpha", "beta"):
        sent = edge.upstreams[name].received[-1]["headers"]
        assert set(client) & set(sent) == {"accept-encoding", "user-agent"}, name
        assert sent["accept-encoding"] == "identity"
        assert sent["user-agent"] == "kept/1.0"


def request_id() -> str:
    return f"req-{uuid.uuid4()}"


FORGED_ROUTE = route_header_value("default", "llama-3.1-8b", 1)
"""A route header a client might send: a real route's value, whose own order starts at gamma
(nothing listens) with no retry, so a request that kept it would fail rather than be served."""


def since(edge: Edge, before: dict[str, int]) -> dict[str, list[dict]]:
    """What each upstream received after `before` (counts per upstream)."""
    return {name: u.received[before[name] :] for name, u in edge.upstreams.items()}


def counts(edge: Edge) -> dict[str, int]:
    return {name: len(u.received) for name, u in edge.upstreams.items()}


def test_a_503_goes_to_the_next_provider_each_attempt_fitted_to_its_provider(edge: Edge) -> None:
    sent = chat("llama3-8b")
    before = counts(edge)
    status, headers, body = edge.post(
        {
            PICK_HEADER: "alpha,beta",
            "x-test-mode-alpha": "503",
            "authorization": "Bearer client",
            "x-gpu-router-route": FORGED_ROUTE,
        },
        sent,
        path=f"{CHAT_PATH}?q=1",
    )
    assert status == 200, body
    assert json.loads(body) == {"served_by": "beta"}
    assert headers["x-gpu-router-provider"] == "beta"
    received = since(edge, before)
    (alpha,), (beta,) = received["alpha"], received["beta"]
    assert alpha["path"] == f"{ALPHA_PREFIX}{CHAT_PATH}?q=1"
    assert alpha["headers"]["authorization"] == f"Bearer {ALPHA_KEY}"
    assert json.loads(alpha["body"]) == {**json.loads(sent), "model": ALPHA_LLAMA}
    # Header edits of alpha's attempt carry over: beta's own rewrite undoes them.
    assert beta["path"] == f"{CHAT_PATH}?q=1"
    assert beta["headers"]["x-api-key"] == BETA_KEY
    assert "authorization" not in beta["headers"]
    assert beta["headers"]["host"] == "localhost"
    assert json.loads(beta["body"]) == {**json.loads(sent), "model": "llama-3.1-8b"}
    for attempt in (alpha, beta):
        assert int(attempt["headers"]["content-length"]) == len(attempt["body"])
        assert "x-gpu-router-route" not in attempt["headers"]


def test_a_retry_onto_a_provider_that_needs_no_rewrite_carries_the_original_length(
    edge: Edge,
) -> None:
    """alpha's rewrite lengthens the body; beta serves the client's model string as its own id,
    so its attempt rewrites nothing and must go out with the original body's length (with
    alpha's it hung until the per-try timeout)."""
    sent = chat("llama-3.1-8b")
    before = counts(edge)
    status, headers, body = edge.post(
        {PICK_HEADER: "alpha,beta", "x-test-mode-alpha": "503"}, sent
    )
    assert status == 200, body
    assert headers["x-gpu-router-provider"] == "beta"
    (alpha,), (beta,) = since(edge, before)["alpha"], since(edge, before)["beta"]
    assert len(alpha["body"]) > len(sent)
    assert beta["body"] == sent
    assert int(beta["headers"]["content-length"]) == len(sent)


@pytest.mark.parametrize(
    ("order", "failure"),
    [
        ("alpha,beta", {"x-test-mode-alpha": "429"}),
        ("alpha,beta", {"x-test-mode-alpha": "reset"}),
        ("alpha,beta", {"x-test-mode-alpha": "hang"}),
        ("gamma,beta", {}),
    ],
    ids=["429", "reset", "per-try timeout", "connection refused"],
)
def test_a_failed_first_attempt_is_answered_by_the_next_provider(
    edge: Edge, order: str, failure: dict[str, str]
) -> None:
    before = counts(edge)
    status, headers, body = edge.post({PICK_HEADER: order, **failure}, chat("llama3-8b"))
    assert status == 200, body
    assert json.loads(body) == {"served_by": "beta"}
    assert headers["x-gpu-router-provider"] == "beta"
    assert len(since(edge, before)["beta"]) == 1


def test_the_chain_walks_every_provider_in_order_and_logs_each_failed_attempt(edge: Edge) -> None:
    rid = request_id()
    status, _, body = edge.post(
        {PICK_HEADER: "gamma,alpha,beta", "x-test-mode-alpha": "429", "x-request-id": rid},
        chat("llama3-8b"),
    )
    assert status == 200, body
    eventually(lambda: edge.logged("gpu-router.edge", rid), "the edge log")
    eventually(lambda: len(edge.logged("gpu-router.attempt", rid)) == 2, "two attempt logs")
    attempts = sorted(
        edge.logged("gpu-router.attempt", rid),
        key=lambda e: e.common_properties.start_time.ToNanoseconds(),
    )
    # The attempt that served (beta) is not on the attempt log: the edge entry describes it.
    assert [e.common_properties.upstream_cluster for e in attempts] == ["gamma", "alpha"]
    gamma, alpha = attempts
    assert gamma.common_properties.response_flags.upstream_connection_failure
    assert alpha.response.response_code.value == 429
    assert alpha.response.response_headers["retry-after"] == "7"
    (outcome,) = edge.logged("gpu-router.edge", rid)
    assert outcome.common_properties.upstream_cluster == "beta"
    assert outcome.response.response_code.value == 200
    assert outcome.common_properties.HasField("time_to_first_upstream_rx_byte")
    assert outcome.common_properties.upstream_request_attempt_count == 3


def test_an_order_that_fails_everywhere_ends_with_its_last_answer(edge: Edge) -> None:
    before = counts(edge)
    status, headers, _ = edge.post(
        {PICK_HEADER: "alpha,beta", "x-test-mode-alpha": "503", "x-test-mode-beta": "503"},
        chat("llama3-8b"),
    )
    assert status == 503
    assert headers["x-gpu-router-provider"] == "beta"
    assert {name: len(got) for name, got in since(edge, before).items()} == {"alpha": 1, "beta": 1}


def test_a_stream_that_fails_before_its_first_byte_is_retried(edge: Edge) -> None:
    status, headers, received, ending = edge.stream(
        {PICK_HEADER: "alpha,beta", "x-test-mode-alpha": "reset", "x-test-mode-beta": "sse"}
    )
    assert (status, ending) == (200, "complete")
    assert headers["x-gpu-router-provider"] == "beta"
    assert received == b"data: beta-0\n\ndata: beta-1\n\ndata: beta-2\n\n"


def test_a_stream_that_fails_after_its_first_byte_is_cut_not_retried(edge: Edge) -> None:
    before = counts(edge)
    status, _, received, ending = edge.stream(
        {PICK_HEADER: "alpha,beta", "x-test-mode-alpha": "sse-midfail", "x-test-mode-beta": "sse"}
    )
    assert status == 200
    assert received == b"data: alpha-0\n\n"
    assert ending != "complete"
    assert since(edge, before)["beta"] == []


def test_the_per_try_timeout_ends_at_the_first_byte_not_the_last(edge: Edge) -> None:
    """A stream that lasts longer than the per-try timeout is not cut (nor retried)."""
    before = counts(edge)
    status, _, received, ending = edge.stream(
        {PICK_HEADER: "alpha,beta", "x-test-mode-alpha": "sse-slow"}
    )
    assert (status, ending) == (200, "complete")
    assert received == b"data: alpha-0\n\ndata: alpha-1\n\ndata: alpha-2\n\n"
    assert since(edge, before)["beta"] == []


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
        ("application/json", b"", {}),
        ("application/json", b'{"messages": [], "tools": [{"model": "x"}]}', {}),
    ],
)
def test_what_the_request_fields_filter_hands_ext_proc(
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
        assert json.loads(answer)["error"]["message"] == "missing model"


def test_ext_proc_gets_exactly_one_message_per_request(edge: Edge) -> None:
    before_seen, before_sent = len(edge.processor.seen), edge.ext_proc_messages()
    for pick, body in (("alpha", chat("llama3-8b", prompt="y" * 200_000)), ("beta", b"{}")):
        edge.post({PICK_HEADER: pick}, body)
    assert edge.ext_proc_messages() - before_sent == 2
    assert [s.kind for s in edge.processor.seen[before_seen:]] == ["request_headers"] * 2


def test_providers_the_route_lacks_are_skipped_and_with_none_left_its_own_order_walked(
    edge: Edge,
) -> None:
    """As when ext_proc is still on the previous policy during a rollout: Envoy skips the names
    of an order that its route does not hold; when none is left it walks the route's own
    order, the fallback route's (here the weights': gamma, where nothing listens, then alpha),
    never a provider unfit for the model."""
    served = []
    for pick in ("zeta,beta", "zeta,eta,theta"):
        before = counts(edge)
        status, headers, body = edge.post({PICK_HEADER: pick}, chat("llama-3.1-8b"))
        assert status == 200, body
        served.append((json.loads(body)["served_by"], headers["x-gpu-router-provider"]))
        assert sum(counts(edge).values()) - sum(before.values()) == 1  # gamma refuses
    assert served == [("beta", "beta"), ("alpha", "alpha")]


def test_ext_proc_pick_routes_to_that_provider_with_its_credential_only(edge: Edge) -> None:
    status, headers, body = edge.post(
        {
            PICK_HEADER: "beta",
            "x-gpu-router-route": FORGED_ROUTE,
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
    assert "x-gpu-router-route" not in sent


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


def test_without_ext_proc_the_fallback_walks_the_weights_order_fitted_to_each(
    edge: Edge,
) -> None:
    """Weights order gamma (nothing listens), alpha (503 here), beta. No ext_proc metadata: the
    upstream Lua looks the client's model string (an alias) up itself."""
    sent = chat("llama3-8b")
    before, rid = counts(edge), request_id()
    status, headers, body = edge.post(
        {
            FAIL_HEADER: "1",
            "x-test-mode-alpha": "503",
            "x-gpu-router-route": FORGED_ROUTE,
            "x-request-id": rid,
        },
        sent,
        path=f"{CHAT_PATH}?f=1",
    )
    assert status == 200, body
    assert json.loads(body) == {"served_by": "beta"}
    assert headers["x-gpu-router-reason"] == FALLBACK_REASON
    received = since(edge, before)
    (alpha,), (beta,) = received["alpha"], received["beta"]
    assert alpha["path"] == f"{ALPHA_PREFIX}{CHAT_PATH}?f=1"
    assert alpha["headers"]["authorization"] == f"Bearer {ALPHA_KEY}"
    assert json.loads(alpha["body"])["model"] == ALPHA_LLAMA
    assert beta["path"] == f"{CHAT_PATH}?f=1"
    assert beta["headers"]["x-api-key"] == BETA_KEY
    assert json.loads(beta["body"]) == {**json.loads(sent), "model": "llama-3.1-8b"}
    eventually(lambda: edge.logged("gpu-router.edge", rid), "the edge log")
    eventually(lambda: len(edge.logged("gpu-router.attempt", rid)) == 2, "two attempt logs")
    attempts = sorted(
        edge.logged("gpu-router.attempt", rid),
        key=lambda e: e.common_properties.start_time.ToNanoseconds(),
    )
    assert [e.common_properties.upstream_cluster for e in attempts] == ["gamma", "alpha"]
    (outcome,) = edge.logged("gpu-router.edge", rid)
    assert outcome.common_properties.upstream_cluster == "beta"


def test_access_log_carries_ext_proc_metadata(edge: Edge) -> None:
    rid = request_id()
    status, _, _ = edge.post({PICK_HEADER: "beta", "x-gpu-router-model": "llama-3.1-8b",
                              "x-request-id": rid})
    assert status == 200

    eventually(lambda: edge.logged("gpu-router.edge", rid), "the access log entry")
    (entry,) = edge.logged("gpu-router.edge", rid)
    assert not entry.request.request_headers  # nobody reads them from the log
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


def ext_proc_latency(edge: Edge, headers: dict[str, str], body: bytes) -> int:
    """ext_proc's latency for one request as booking reads it from the edge access log's custom
    tag (0: none)."""
    rid = request_id()
    edge.post({**headers, "x-request-id": rid}, body)
    eventually(lambda: edge.logged("gpu-router.edge", rid), "the edge log")
    (entry,) = edge.logged("gpu-router.edge", rid)
    assert not entry.common_properties.filter_state_objects  # the whole state costs too much
    return ext_proc_latency_us(entry.common_properties)


def test_the_edge_log_times_the_ext_proc_call(edge: Edge) -> None:
    assert ext_proc_latency(edge, {PICK_HEADER: "beta"}, chat("llama3-8b")) > 0
    assert ext_proc_latency(edge, {FAIL_HEADER: "1"}, chat("llama3-8b")) > 0  # failed open
    assert ext_proc_latency(edge, {PICK_HEADER: "beta"}, b'{"model": 1}') == 0  # never called


def captured(edge: Edge, script: Script) -> str | None:
    """Runs `script` through the edge: the client must get every byte unchanged, each chunk
    before the upstream sends the next; returns the usage text the edge log carries."""
    status, received, rid = edge.lockstep(script)
    assert status == script.status
    assert received == b"".join(script.chunks)
    usage = edge.usage_logged(rid)
    if usage is None:
        return None
    assert list(usage) == ["text"]
    return usage["text"]


def test_a_json_bodys_usage_is_captured_from_its_key_on(edge: Edge) -> None:
    body = (
        b'{"id":"c1","choices":[{"message":{"content":"the word \\"usage\\""}}],'
        b'"usage":{"prompt_tokens":12,"completion_tokens":5},"system_fingerprint":"fp"}'
    )
    text = captured(edge, Script("application/json; charset=utf-8", [body[:40], body[40:]]))
    assert text == '"usage":{"prompt_tokens":12,"completion_tokens":5},"system_fingerprint":"fp"}'
    usage = normalise(make_record(usage_text=text), "openai")
    assert (usage.estimated, usage.input_tokens, usage.output_tokens) == (False, 12, 5)


@pytest.mark.parametrize(
    "cuts",
    [(len('{"id":"c","us'),), (len('{"id":"c","usage"'),), (9, 10, 12, 14)],
    ids=["inside the key", "after the key", "over four tiny chunks"],
)
def test_a_usage_key_split_across_chunks_is_found(edge: Edge, cuts: tuple[int, ...]) -> None:
    body = b'{"id":"c","usage":{"input_tokens":3,"output_tokens":4}}'
    bounds = (0, *cuts, len(body))
    chunks = [body[start:end] for start, end in itertools.pairwise(bounds)]
    text = captured(edge, Script("application/json", chunks))
    assert text == '"usage":{"input_tokens":3,"output_tokens":4}}'
    usage = normalise(make_record(usage_text=text), "anthropic")
    assert (usage.estimated, usage.input_tokens, usage.output_tokens) == (False, 3, 4)


def test_a_json_capture_keeps_at_most_4_kib(edge: Edge) -> None:
    body = b'{"usage":{"prompt_tokens":1,"completion_tokens":1},"pad":"' + b"x" * 10_000 + b'"}'
    chunks = [body[at : at + 3000] for at in range(0, len(body), 3000)]
    text = captured(edge, Script("application/json", chunks))
    assert text is not None
    assert text.encode() == body[1 : 1 + 4096]


def test_an_openai_streams_usage_event_is_captured_as_the_stream_flows(edge: Edge) -> None:
    """Each chunk reaches the client before the upstream sends the next (lockstep): the filter
    does not hold the stream back; the usage line comes with the last chunk."""
    delta = b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
    last = b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}\n\n'
    text = captured(edge, Script("text/event-stream", [delta, delta, last + b"data: [DONE]\n\n"]))
    assert text == last.decode()[:-1]
    usage = normalise(make_record(usage_text=text, stream=True), "openai")
    assert (usage.estimated, usage.input_tokens, usage.output_tokens) == (False, 9, 2)


def test_an_anthropic_streams_usage_lines_are_kept_whole_when_split(edge: Edge) -> None:
    start = (
        b'data: {"type":"message_start","message":{"id":"m","usage":'
        b'{"input_tokens":25,"output_tokens":1}}}\n'
    )
    delta = b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}\n'
    chunks = [
        b"event: message_start\n" + start[:30],
        start[30:] + b"\n",
        b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"hi"}}\n\n',
        b"event: message_delta\n" + delta[:60],
        delta[60:80],
        delta[80:] + b'\nevent: message_stop\ndata: {"type":"message_stop"}\n\n',
    ]
    text = captured(edge, Script("text/event-stream", chunks))
    assert text == (start + delta).decode()
    usage = normalise(make_record(usage_text=text, stream=True), "anthropic")
    assert (usage.estimated, usage.input_tokens, usage.output_tokens) == (False, 25, 15)


@pytest.mark.parametrize(
    ("content_type", "chunks"),
    [
        (
            "application/json",
            [
                b'{"id":"c1","choices":[{"message":{"content":"hi"}}],',
                b'"usage":{"prompt_tokens":9,"completion_tokens":2}',
                b',"system_fingerprint":"fp"}',
            ],
        ),
        (
            "text/event-stream",
            [
                b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n',
                b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}\n\n',
                b"data: [DONE]\n\n",
            ],
        ),
    ],
    ids=["JSON", "stream"],
)
def test_usage_is_kept_when_the_client_hangs_up_before_the_body_ends(
    edge: Edge, content_type: str, chunks: list[bytes]
) -> None:
    """The client closes once it has the usage chunk, before the upstream sends the last one:
    the request is still billed from the usage the provider reported, not estimated."""
    script = Script(content_type, chunks)
    status, received, rid = edge.lockstep(script, hang_up_after=2)
    assert (status, received) == (200, b"".join(chunks[:2]))
    usage = edge.usage_logged(rid)
    assert usage is not None, "the usage seen before the hang-up was not logged"
    record = make_record(usage_text=usage["text"], stream=content_type == "text/event-stream")
    reported = normalise(record, "openai")
    assert (reported.estimated, reported.input_tokens, reported.output_tokens) == (False, 9, 2)


@pytest.mark.parametrize(
    ("status", "content_type", "chunks"),
    [
        (200, "application/json", [b'{"id":"c1",', b'"choices":[]}']),
        (200, "text/event-stream", [b'data: {"usage":null}\n\n', b"data: [DONE]\n\n"]),
        (503, "application/json", [b'{"usage":{"prompt_tokens":1,"completion_tokens":1}}']),
        (200, "text/plain", [b'"usage":{"prompt_tokens":1,"completion_tokens":1}']),
    ],
    ids=["JSON without usage", "stream with null usage", "error status", "other content type"],
)
def test_nothing_is_captured_without_a_usage_report_in_a_2xx_json_or_stream(
    edge: Edge, status: int, content_type: str, chunks: list[bytes]
) -> None:
    assert captured(edge, Script(content_type, chunks, status=status)) is None
