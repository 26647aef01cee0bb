"""The processes the benchmarks run: Envoys from static config (the fast upstream, Envoy direct,
the floor of the stack) and the bench policy, all on free ports of 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import yaml
from google.protobuf import json_format

from control_plane.translate.clusters import ext_proc_cluster
from control_plane.translate.settings import EdgeSettings
from gpu_router import pki
from gpu_router.bootstrap import edge_secrets
from gpu_router.processes import EnvoyAdmin, ManagedProcess, envoy_binary, free_port, port_open

MODEL = "bench-model"
COMPLETION = json.dumps({
    "id": "bench", "object": "chat.completion", "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
})


UPSTREAM_MAX_BODY = 1 << 20
"""The largest request body the fast upstream reads (the benches send up to 200 KB)."""


def static_envoy(name: str, work: Path, listen_port: int, route: dict, clusters: list[dict],
                 concurrency: list[str] = (), filters: list[dict] = (),
                 access_log: list[dict] = (), secrets: list[dict] = ()) -> ManagedProcess:
    admin = free_port()
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": name, "per_connection_buffer_limit_bytes": 33554432,
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": name,
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
                        "http_filters": [*filters, {"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                        "access_log": list(access_log),
                    }}]}],
            }],
            "clusters": clusters,
            "secrets": list(secrets),
        },
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [envoy_binary(), "-c", str(path), "--base-id", str(free_port()), "--log-level", "error",
            *concurrency]
    process = ManagedProcess(name, argv, work / f"{name}.log").start()
    try:
        process.wait_until(EnvoyAdmin(admin).ready, f"{name} to start")
    except BaseException:
        process.stop()  # the caller never gets a handle to stop it
        raise
    return process


def admin_of(work: Path, name: str) -> EnvoyAdmin:
    """The admin endpoint of the static Envoy `name` started in `work`."""
    config = yaml.safe_load((work / f"{name}.yaml").read_text())
    return EnvoyAdmin(config["admin"]["address"]["socket_address"]["port_value"])


def fast_upstream(work: Path, port: int) -> ManagedProcess:
    """An Envoy answering every request with COMPLETION once it has read the request's body,
    as a provider does. A direct response sent before the body is read makes Envoy close the
    connection (`connection: close`), so every Envoy in front of it opened a connection per
    request: the buffer filter holds the answer until the body is in."""
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": COMPLETION}},
             "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}]}
    whole_body = {"name": "envoy.filters.http.buffer", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
        "max_request_bytes": UPSTREAM_MAX_BODY}}
    return static_envoy("upstream", work, port, route, [], ["--concurrency", "1"], [whole_body])


def direct_envoy(work: Path, port: int, upstream_port: int) -> ManagedProcess:
    route = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
    return static_envoy("direct", work, port, route, [cluster("upstream", upstream_port)])


def cluster(name: str, port: int, **extra: object) -> dict:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s", **extra,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def floor_stack(work: Path, port: int, upstream_port: int, http2: bool = False
                ) -> list[ManagedProcess]:
    """The floor of the chosen stack: an Envoy with the edge's ext_proc filter settings (request
    headers only, one message per request, same timeout) and the edge's mutual TLS to ext_proc,
    in front of a grpc.aio ext_proc that answers every request with one fixed header mutation
    (bench/floor_ext_proc.py). `http2`: the same answer over the ext_proc filter's http_service
    instead (bench/floor_ext_proc_h2.py)."""
    name = "floor-h2" if http2 else "floor"
    server_port = free_port()
    certs = pki.ensure(work / f"{name}-certs", [pki.Identity(pki.Role.EDGE, f"{name}-edge"),
                                               pki.Identity(pki.Role.EXT_PROC, f"{name}-ext-proc")])
    served = certs[f"{name}-ext-proc"]
    script = "floor_ext_proc_h2.py" if http2 else "floor_ext_proc.py"
    server = ManagedProcess(f"{name}-ext-proc", [
        sys.executable, str(Path(__file__).with_name(script)), f"127.0.0.1:{server_port}",
        str(served.ca), str(served.cert), str(served.key)], work / f"{name}-ext-proc.log").start()
    tls = json.loads(json_format.MessageToJson(ext_proc_cluster(EdgeSettings()).transport_socket))
    service = ({"http_service": {"http_service": {"http_uri": {
        "uri": f"https://{name}-ext-proc/process", "cluster": f"{name}-ext-proc",
        "timeout": "0.2s"}}}} if http2 else
        {"grpc_service": {"envoy_grpc": {"cluster_name": f"{name}-ext-proc"}}})
    ext_proc = {"name": "envoy.filters.http.ext_proc", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        **service,
        "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SKIP",
                            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"},
        "message_timeout": "0.2s", "failure_mode_allow": False}}
    h2 = {"typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}}
    try:
        server.wait_until(lambda: port_open(server_port), f"the {name} ext_proc to listen")
        envoy = static_envoy(name, work, port, {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}},
                             [cluster("upstream", upstream_port),
                              cluster(f"{name}-ext-proc", server_port, **h2, transport_socket=tls)],
                             filters=[ext_proc], secrets=edge_secrets(certs[f"{name}-edge"]))
    except BaseException:
        server.stop()
        raise
    return [server, envoy]


def bench_policy(path: Path, upstream_port: int, keys: int = 0, providers: int = 1) -> Path:
    """The bench policy: `providers` identical providers on the fast upstream (one: "fast");
    with `keys`, that many clients, the first holding BENCH_KEY."""
    clients = [{"name": f"client-{i}",
                "key_sha256": hashlib.sha256(BENCH_KEY.encode() if i == 0 else os.urandom(32)).hexdigest()}
               for i in range(keys)]
    names = ["fast"] if providers == 1 else [f"fast-{i}" for i in range(providers)]
    path.write_text(yaml.safe_dump({
        **({"clients": clients} if clients else {}),
        "version": 1,
        "providers": [{
            "name": name, "base_url": f"http://127.0.0.1:{upstream_port}", "health_check_path": "/health",
            "gpus": [{"type": "H100", "memory_gb": 80}],
            "models": [{"name": MODEL, "id": MODEL, "gpu": "H100", "price": {"input": 0.1, "output": 0.1, "cached_input": 0.05, "reasoning": 0.1}}],
        } for name in names],
        "models": [{"name": MODEL, "min_gpu_memory_gb": 1}],
        "policies": [{"name": "all", "strategy": "balanced"}],
    }))
    return path


BENCH_KEY = "gr-bench-" + os.urandom(16).hex()


def chat_body(prompt_bytes: int) -> bytes:
    return json.dumps({"model": MODEL, "max_tokens": 16,
                       "messages": [{"role": "user", "content": "x" * prompt_bytes}]}).encode()
