"""Degraded modes that are fast, not just correct: a frozen or crashed ext_proc, a frozen control
plane, under steady load through the real stack.

What is asserted comes from Envoy's own counters (http.edge.ext_proc.*, the ext_proc cluster's
health-check stats and /clusters health flags), never from latency: once Envoy has marked a frozen
replica unhealthy, requests go to the fallback route without waiting out ext_proc's
message_timeout, so the filter's message_timeouts counter stops growing while fallback-served
requests (failure_mode_allowed) keep growing.
"""

from __future__ import annotations

from polling import eventually
from stack_harness import CLIENTS, Traffic, frozen

from gpu_router.stack import EdgeHandle, Stack

MODEL = "llama-3.1-8b"
BATCH = {"x-workload": "batch"}
EXT_PROC = "gpu-router.ext_proc"
FILTER = "http.edge.ext_proc."


def filter_stats(edge: EdgeHandle) -> dict[str, int]:
    """The edge's ext_proc filter counters, by short name (message_timeouts, ...)."""
    return {name.removeprefix(FILTER): value for name, value in edge.admin.stats(FILTER).items()}


def health_flags(edge: EdgeHandle) -> list[str]:
    """Each ext_proc replica's health flags in /clusters ("healthy", "/failed_active_hc...")."""
    prefix = f"{EXT_PROC}::"
    return [line.rsplit("::", 1)[1] for line in edge.admin.clusters().splitlines()
            if line.startswith(prefix) and "::health_flags::" in line]


def unhealthy(edge: EdgeHandle) -> bool:
    flags = health_flags(edge)
    return bool(flags) and all(f != "healthy" for f in flags)


def healthy(edge: EdgeHandle) -> bool:
    flags = health_flags(edge)
    return bool(flags) and all(f == "healthy" for f in flags)


def grows(edge: EdgeHandle, counter: str, by: int, what: str) -> dict[str, int]:
    """Wait until the filter's `counter` has grown by `by` from now; return the stats then."""
    start = filter_stats(edge)[counter]
    return eventually(lambda: (s := filter_stats(edge))[counter] >= start + by and s, what)


def routed_by_ext_proc_again(edge: EdgeHandle) -> None:
    grows(edge, "stream_msgs_received", 20, "ext_proc to answer requests again")


def test_a_frozen_ext_proc_is_found_unhealthy_then_costs_no_message_timeout(stack: Stack) -> None:
    edge = stack.edges[0]
    with Traffic(stack, MODEL, BATCH, threads=CLIENTS) as traffic:
        routed_by_ext_proc_again(edge)
        with frozen(stack, "ext-proc-1"):
            eventually(lambda: unhealthy(edge), "Envoy to mark the frozen ext_proc unhealthy")
            detected = filter_stats(edge)
            # Only requests already waiting on ext_proc when it was found out (one per client
            # thread at most) may still time out; every later one fails over at once.
            after = grows(edge, "failure_mode_allowed", 4 * CLIENTS, "fallback-served requests")
            assert after["message_timeouts"] - detected["message_timeouts"] <= CLIENTS, after
        eventually(lambda: healthy(edge), "the ext_proc replica to be healthy again")
        routed_by_ext_proc_again(edge)
    assert traffic.failures() == {}, traffic.failed
    checks = edge.admin.stats(f"cluster.{EXT_PROC}.health_check.")
    assert checks[f"cluster.{EXT_PROC}.health_check.failure"] > 0, checks


def test_a_crashed_ext_proc_costs_no_message_timeout_and_is_used_again_once_back(
    stack: Stack,
) -> None:
    edge = stack.edges[0]
    with Traffic(stack, MODEL, BATCH, threads=CLIENTS) as traffic:
        routed_by_ext_proc_again(edge)
        before = filter_stats(edge)
        stack.kill("ext-proc-1")  # refused connections from now on
        after = grows(edge, "failure_mode_allowed", 4 * CLIENTS, "fallback-served requests")
        assert after["message_timeouts"] - before["message_timeouts"] <= CLIENTS, after
        eventually(lambda: unhealthy(edge), "Envoy to mark the crashed ext_proc unhealthy")
        stack.restart("ext-proc-1")
        eventually(lambda: healthy(edge), "the restarted ext_proc to be healthy")
        routed_by_ext_proc_again(edge)
    assert traffic.failures() == {}, traffic.failed


def test_a_frozen_control_plane_leaves_ext_proc_serving(stack: Stack) -> None:
    """ext_proc's health does not hang on the control plane: it keeps its last policy."""
    edge = stack.edges[0]
    checks = f"cluster.{EXT_PROC}.health_check.success"
    with Traffic(stack, MODEL, BATCH, threads=CLIENTS) as traffic:
        routed_by_ext_proc_again(edge)
        with frozen(stack, "control-plane"):
            passed = edge.admin.stats(checks)[checks]
            grows(edge, "stream_msgs_received", 100,
                  "ext_proc to answer with the control plane frozen")
            eventually(lambda: edge.admin.stats(checks)[checks] >= passed + 4,
                       "ext_proc to pass health checks with the control plane frozen")
    assert traffic.failures() == {}, traffic.failed
