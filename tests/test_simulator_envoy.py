"""Simulated providers behind the real Envoy 1.40: what the edge the translator generates makes
of each fault.

Two simulators are the providers "first" (cheaper) and "second" of a policy; the bootstrap holds
translate()'s listener, routes and clusters. No ext_proc runs, so every request takes the
fallback route, which tries first, then second (the route's retry policy walks the order on 5xx,
resets and 429). Envoy actively health-checks both on /healthz. Outlier detection is set out of
reach: these tests count each fault's attempts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from envoy_fixtures import envoy_argv
from simulator_fixtures import (
    MODELS,
    Reply,
    call,
    fast_spec,
    poll_until,
    running_sims,
    set_fault,
    stats,
)
from translate_fixtures import static_bootstrap, write_bootstrap

from control_plane.policy.load import load_policy_text
from control_plane.translate import EdgeSettings, translate
from gpu_router.processes import EnvoyAdmin, ManagedProcess, free_port
from simulator.server import ProviderSim

CHAT = "/v1/chat/completions"
BODY = {"model": MODELS[0], "messages": [{"role": "user", "content": "hello"}]}
PROVIDER = """\
  - name: {name}
    base_url: http://127.0.0.1:{port}
    usage_format: none
    health_check_path: /healthz
    health_check: {{interval_ms: 200, timeout_ms: 1000, unhealthy_threshold: 1, healthy_threshold: 1}}
    outlier_detection: {{consecutive_5xx: 1000, consecutive_gateway_failure: 1000,
                        consecutive_local_origin_failure: 1000, failure_percentage_threshold: 100}}
    gpus: [{{type: H100, memory_gb: 80}}]
    models:
{models}"""
POLICY = """\
version: 1
providers:
{providers}
models:
{models}
policies:
  - {{name: default, strategy: cost, max_fallbacks: 1, per_try_timeout_ms: 1000}}
"""


def policy_text(ports: dict[str, int]) -> str:
    """first and second serve every simulated model; first is the cheaper."""
    providers = [
        PROVIDER.format(name=name, port=port, models="\n".join(
            f"      - {{name: {model}, gpu: H100, price: {{input: {price}, output: {price}}}}}"
            for model in MODELS))
        for (name, port), price in zip(ports.items(), (0.1, 0.2), strict=True)
    ]
    models = "\n".join(f"  - {{name: {model}}}" for model in MODELS)
    return POLICY.format(providers="\n".join(providers), models=models)


def bootstrap(path: Path, edge_port: int, admin_port: int, ports: dict[str, int]) -> Path:
    config = load_policy_text(policy_text(ports), "simulator-envoy-test")
    settings = EdgeSettings(edge_port=edge_port, ext_proc_endpoints=(("127.0.0.1", free_port()),))
    resources = translate(config, settings, {})
    return write_bootstrap(
        static_bootstrap(resources, admin_port=admin_port, xds_port=free_port()), path
    )


def host_flags(admin: EnvoyAdmin, sim: ProviderSim) -> str:
    """The health_flags line of a provider's host in /clusters ("healthy" or the failure flags)."""
    prefix = f"{sim.spec.name}::127.0.0.1:{sim.port}::health_flags::"
    for line in admin.clusters().splitlines():
        if line.startswith(prefix):
            return line.rsplit("::", 1)[1]
    return "absent"


@pytest.fixture(scope="module")
def edge(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[int, EnvoyAdmin, ProviderSim, ProviderSim]]:
    specs = (
        fast_spec("first", health_check_path="/healthz"),
        fast_spec("second", health_check_path="/healthz"),
    )
    with running_sims(*specs) as (first, second):
        tmp = tmp_path_factory.mktemp("envoy")
        edge_port, admin_port = free_port(), free_port()
        config = bootstrap(tmp / "envoy.pb", edge_port, admin_port,
                           {sim.spec.name: sim.port for sim in (first, second)})
        envoy = ManagedProcess("envoy", envoy_argv(config), tmp / "envoy.log")
        admin = EnvoyAdmin(admin_port)
        try:
            envoy.start()
            envoy.wait_until(admin.ready, "admin ready")
            envoy.wait_until(
                lambda: (
                    host_flags(admin, first) == host_flags(admin, second) == "healthy"
                ),
                "both simulators healthy",
            )
            yield edge_port, admin, first, second
        finally:
            envoy.stop()


@pytest.fixture
def envoy_edge(
    edge: tuple[int, EnvoyAdmin, ProviderSim, ProviderSim],
) -> Iterator[tuple[int, EnvoyAdmin, ProviderSim, ProviderSim]]:
    _, _, first, second = edge
    for sim in (first, second):
        call(sim.port, "POST", "/_sim/reset")
    yield edge


def through(edge_port: int, body: object = BODY) -> Reply:
    return call(edge_port, "POST", CHAT, body)


def test_json_and_sse_pass_through_envoy(
    envoy_edge: tuple[int, EnvoyAdmin, ProviderSim, ProviderSim],
) -> None:
    edge_port, _, first, _ = envoy_edge
    reply = through(edge_port)
    assert (reply.status, reply.headers["x-sim-provider"]) == (200, "first")
    streamed = through(
        edge_port,
        {**BODY, "stream": True, "max_tokens": 2, "stream_options": {"include_usage": True}},
    )
    assert streamed.status == 200
    events = streamed.body.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert json.loads(events[-3].removeprefix("data: "))["usage"]["completion_tokens"] == 2
    assert stats(first.port)["requests"] == 2


def test_two_mib_body_through_envoy(
    envoy_edge: tuple[int, EnvoyAdmin, ProviderSim, ProviderSim],
) -> None:
    edge_port, _, first, _ = envoy_edge
    big = {**BODY, "messages": [{"role": "user", "content": "y" * (2 * 1024 * 1024)}]}
    reply = through(edge_port, big)
    assert reply.status == 200
    assert stats(first.port)["last_request"]["body_bytes"] == len(json.dumps(big))


@pytest.mark.parametrize(
    "fault",
    [
        {"mode": "reset"},
        {"mode": "error", "status": 502},
        {"mode": "rate_limit"},
        {"mode": "no_capacity"},
        {"mode": "hang"},
    ],
)
def test_each_fault_is_retried_on_the_next_priority(
    envoy_edge: tuple[int, EnvoyAdmin, ProviderSim, ProviderSim], fault: dict[str, object]
) -> None:
    edge_port, _, first, second = envoy_edge
    set_fault(first.port, **fault)
    reply = through(edge_port)
    assert (reply.status, reply.headers["x-sim-provider"]) == (200, "second")
    assert stats(first.port)["faults"]["hit"] == 1
    assert stats(second.port)["requests"] == 1


def test_total_error_fails_envoy_health_checks_until_cleared(
    envoy_edge: tuple[int, EnvoyAdmin, ProviderSim, ProviderSim],
) -> None:
    edge_port, admin, first, _ = envoy_edge
    set_fault(first.port, mode="error", status=503)
    poll_until(lambda: host_flags(admin, first) == "/failed_active_hc", "first to fail HC")
    reply = through(edge_port)
    assert (reply.status, reply.headers["x-sim-provider"]) == (200, "second")
    set_fault(first.port, mode="none")
    poll_until(lambda: host_flags(admin, first) == "healthy", "first healthy again")
