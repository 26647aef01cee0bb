"""A fleet on one machine through `Stack`: two Envoy nodes on their own edge ports, two ext_proc
replicas, one control plane, the simulated providers; an ext_proc replica killed and restarted."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import yaml
from polling import eventually

from control_plane.policy.load import default_policy_path
from control_plane.translate.fallback_routes import FALLBACK_REASON
from gpu_router.processes import free_port, port_open
from gpu_router.stack import EdgeHandle, Stack, StackPorts

MODEL = "llama-3.1-8b"
EXT_PROC_HOST_STREAMS = re.compile(
    r"^gpu-router\.ext_proc::127\.0\.0\.1:(\d+)::rq_total::(\d+)$", re.MULTILINE
)
"""Per-host lines of Envoy's /clusters for the ext_proc cluster."""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("fleet")
    document = yaml.safe_load(default_policy_path().read_text())
    for provider in document["providers"]:
        provider["base_url"] = f"http://127.0.0.1:{free_port()}"
    policy = directory / "policy.yaml"
    policy.write_text(yaml.safe_dump(document, sort_keys=False))
    stack = Stack(
        policy=policy,
        log_dir=directory / "logs",
        ports=StackPorts.free(),
        edge_nodes=2,
        ext_proc_replicas=2,
        accounting=["--no-accounting"],
    )
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def chat(edge: EdgeHandle) -> tuple[int, str]:
    """(status, x-gpu-router-reason) of one chat completion through `edge`."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    request = urllib.request.Request(
        f"{edge.url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers.get("x-gpu-router-reason", "")
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("x-gpu-router-reason", "")


def picked_by_ext_proc(edge: EdgeHandle) -> bool:
    status, reason = chat(edge)
    return status == 200 and reason not in ("", FALLBACK_REASON)


def ext_proc_streams(edge: EdgeHandle) -> dict[int, int]:
    """ext_proc replica port -> streams this Envoy node opened to it (from /clusters)."""
    found = EXT_PROC_HOST_STREAMS.findall(edge.admin.clusters())
    return {int(port): int(total) for port, total in found}


def every_replica_serves_every_node(stack: Stack, since: dict[str, dict[int, int]]) -> bool:
    """Sends one request through each node; True once every node has opened streams to
    every replica since `since` (per node, per replica port) and was routed by ext_proc."""
    routed = all(picked_by_ext_proc(edge) for edge in stack.edges)
    return routed and all(
        ext_proc_streams(edge).get(port, 0) > since[edge.node_id].get(port, 0)
        for edge in stack.edges
        for port in stack.ext_proc_ports
    )


def test_each_node_listens_on_its_own_edge_port_and_routes(fleet: Stack) -> None:
    first, second = fleet.edges
    assert first.edge_port == fleet.ports.edge
    assert second.edge_port not in (fleet.ports.edge, *fleet.ext_proc_ports)
    assert port_open(first.edge_port) and port_open(second.edge_port)
    assert fleet.fleet_synced()
    nodes = {n["id"]: n for n in fleet.control.xds_nodes()}
    assert nodes[first.node_id]["edge_port"] is None
    assert nodes[second.node_id]["edge_port"] == second.edge_port
    assert all(picked_by_ext_proc(edge) for edge in fleet.edges)


def test_both_nodes_use_both_ext_proc_replicas(fleet: Stack) -> None:
    assert len(set(fleet.ext_proc_ports)) == 2
    assert fleet.ext_proc_ports[0] == fleet.ports.ext_proc
    nothing: dict[str, dict[int, int]] = {edge.node_id: {} for edge in fleet.edges}
    eventually(
        lambda: every_replica_serves_every_node(fleet, nothing),
        "each node to open streams to each replica",
    )


def test_a_killed_replica_is_restarted_on_its_port_and_serves_again(fleet: Stack) -> None:
    replica = fleet.processes["ext-proc-1"]
    old_pid = replica.pid
    fleet.kill("ext-proc-1")
    assert not replica.alive() and not port_open(fleet.ports.ext_proc)
    eventually(
        lambda: all(picked_by_ext_proc(edge) for edge in fleet.edges),
        "the surviving replica to route through both nodes",
    )

    fleet.restart("ext-proc-1")

    assert replica.alive() and replica.pid != old_pid
    assert port_open(fleet.ports.ext_proc)
    assert fleet.fleet_synced()
    before = {edge.node_id: ext_proc_streams(edge) for edge in fleet.edges}
    eventually(
        lambda: every_replica_serves_every_node(fleet, before),
        "both nodes to use the restarted replica and the other one",
    )
    outcomes = [chat(edge) for edge in fleet.edges for _ in range(10)]
    assert all(status == 200 for status, _ in outcomes), outcomes
    assert not [reason for _, reason in outcomes if reason == FALLBACK_REASON], outcomes


def test_a_restarted_control_plane_resyncs_every_node(fleet: Stack) -> None:
    control_plane = fleet.processes["control-plane"]
    old_pid = control_plane.pid
    fleet.kill("control-plane")
    assert all(picked_by_ext_proc(edge) for edge in fleet.edges), "nodes keep their last config"

    fleet.restart("control-plane")

    assert control_plane.pid != old_pid and fleet.fleet_synced()
    assert {n["id"] for n in fleet.control.xds_nodes() if n["cluster"] == "gpu-router-edge"} == {
        edge.node_id for edge in fleet.edges
    }
    assert all(picked_by_ext_proc(edge) for edge in fleet.edges)
