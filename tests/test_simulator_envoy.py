"""Simulated providers behind the real Envoy 1.40: what Envoy makes of each fault.

One static cluster holds two simulators at priorities 0 and 1; the route retries on 5xx, resets
and 429 with the previous_priorities plugin, so a failed attempt on "first" moves to "second".
Envoy actively health-checks both on /healthz.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
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

from gpu_router.processes import EnvoyAdmin, ManagedProcess, envoy_binary, free_port
from simulator.server import ProviderSim

CHAT = "/v1/chat/completions"
BODY = {"model": MODELS[0], "messages": [{"role": "user", "content": "hello"}]}


def endpoint(port: int, priority: int) -> dict[str, object]:
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    return {"priority": priority, "lb_endpoints": [{"endpoint": {"address": address}}]}


def bootstrap(edge_port: int, admin_port: int, first: int, second: int) -> dict[str, object]:
    route = {
        "match": {"prefix": "/"},
        "route": {
            "cluster": "providers",
            "timeout": "20s",
            "retry_policy": {
                "retry_on": "5xx,reset,retriable-status-codes",
                "retriable_status_codes": [429],
                "num_retries": 1,
                "per_try_timeout": "1s",
                "retry_priority": {
                    "name": "envoy.retry_priorities.previous_priorities",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.retry.priority."
                        "previous_priorities.v3.PreviousPrioritiesConfig",
                        "update_frequency": 1,
                    },
                },
            },
        },
    }
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager."
        "v3.HttpConnectionManager",
        "stat_prefix": "edge",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    listener = {
        "name": "edge",
        "per_connection_buffer_limit_bytes": 32 * 1024 * 1024,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": edge_port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }
    cluster = {
        "name": "providers",
        "type": "STATIC",
        "connect_timeout": "1s",
        "per_connection_buffer_limit_bytes": 32 * 1024 * 1024,
        "load_assignment": {
            "cluster_name": "providers",
            "endpoints": [endpoint(first, 0), endpoint(second, 1)],
        },
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "0.2s",
                "no_traffic_interval": "0.2s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "http_health_check": {"path": "/healthz"},
            }
        ],
    }
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {"listeners": [listener], "clusters": [cluster]},
    }


def host_flags(admin: EnvoyAdmin, port: int) -> str:
    """The health_flags line of one host in /clusters ("healthy" or the failure flags)."""
    for line in admin.clusters().splitlines():
        if line.startswith(f"providers::127.0.0.1:{port}::health_flags::"):
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
        config = tmp / "envoy.json"
        config.write_text(json.dumps(bootstrap(edge_port, admin_port, first.port, second.port)))
        envoy = ManagedProcess(
            "envoy",
            [envoy_binary(), "-c", str(config), "--disable-hot-restart", "-l", "warning"],
            tmp / "envoy.log",
        )
        admin = EnvoyAdmin(admin_port)
        try:
            envoy.start()
            envoy.wait_until(admin.ready, "admin ready")
            envoy.wait_until(
                lambda: (
                    host_flags(admin, first.port) == host_flags(admin, second.port) == "healthy"
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
    poll_until(lambda: host_flags(admin, first.port) == "/failed_active_hc", "first to fail HC")
    reply = through(edge_port)
    assert (reply.status, reply.headers["x-sim-provider"]) == (200, "second")
    set_fault(first.port, mode="none")
    poll_until(lambda: host_flags(admin, first.port) == "healthy", "first healthy again")
