"""Failover and degraded modes under load, through the real stack. Three cases:

kill    Two Envoy nodes, two ext_proc replicas, one control plane, three simulated providers
        (one process each), 2 clients per node. After a quiet period the provider winning every
        request (runpod, cost-first) is killed: connections to it are refused. Printed: client
        errors (the target is zero); per node, attempts that still reached the dead provider
        before the control plane ejected it and after; the time from the kill to the last
        attempt any node sent it and to the control plane's ejection; p50/p99 client latency.
faults  64 concurrent clients (--clients) through one node while the provider winning at that
        moment answers 503, then 429, then resets, then hangs past per_try_timeout_ms (1 s),
        each for --phase seconds and cleared for as long; then every provider answers 503.
freeze  64 clients while the ext_proc replica is frozen (SIGSTOP) for --freeze seconds: how
        long Envoy takes to find it unhealthy, and what requests cost before and after that.

faults and freeze print, per phase: requests, failed requests, upstream attempts per request
(Envoy's stats: provider clusters' upstream_rq_total over http.edge.downstream_rq_total),
p50/p99 client latency and who served; faults also the requests ext_proc answered itself
(no provider left) and the control plane's provider states, freeze ext_proc's timeouts and
the requests sent on the fallback route.

    python bench/failover.py [--case kill faults freeze] [--clients 64] [--phase 3] [--freeze 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml
from load import Load, Phases, percentile_ms

from control_plane.policy.load import default_policy_path
from gpu_router.processes import EnvoyAdmin, free_port, port_open, python_module
from gpu_router.stack import Stack, StackPorts

VICTIM = "runpod"
PROVIDERS = ("lambda", "coreweave", "runpod")
FAULTS = (
    ("503", {"mode": "error", "status": 503}),
    ("429 (Retry-After 2 s)", {"mode": "rate_limit", "retry_after_s": 2}),
    ("reset", {"mode": "reset"}),
    ("hang (per-try timeout 1 s)", {"mode": "hang"}),
)
EXT_PROC_CLUSTER = "gpu-router.ext_proc"
EXT_PROC_FILTER = "http.edge.ext_proc."


def fleet_policy(path: Path) -> tuple[Path, dict[str, int]]:
    """The default policy with three providers on free ports and a 1 s per-try timeout."""
    document = yaml.safe_load(default_policy_path().read_text())
    document["providers"] = [p for p in document["providers"] if p["name"] in PROVIDERS]
    ports = {}
    for provider in document["providers"]:
        ports[provider["name"]] = free_port()
        provider["base_url"] = f"http://127.0.0.1:{ports[provider['name']]}"
    for policy in document["policies"]:
        policy["per_try_timeout_ms"] = 1000
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path, ports


def one_node_stack(work: Path, workers: int) -> tuple[Stack, dict[str, int]]:
    policy, ports = fleet_policy(work / "policy.yaml")
    stack = Stack(policy=policy, log_dir=work, ports=StackPorts.free(),
                  accounting=["--no-accounting"], ext_proc_workers=workers)
    return stack.start(), ports


def sim_control(port: int, action: str, body: dict | None = None) -> None:
    """POST to a simulated provider's /_sim API (fault, reset)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/_sim/{action}",
                                     data=json.dumps(body or {}).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


def winner(load: Load) -> str:
    """The provider that served most of the last half second's requests."""
    now = time.monotonic()
    served = [s.provider for s in load.window(now - 0.5, now) if s.status == 200 and s.provider]
    return max(set(served), key=served.count) if served else VICTIM


def fleet_states(stack: Stack) -> str:
    """The control plane's state of each provider, e.g. "lambda healthy, runpod ejected"."""
    providers = json.loads(stack.control_get("/v1/health")[1])["providers"]
    return ", ".join(f"{name} {providers.get(name, {}).get('state', '?')}" for name in PROVIDERS)


def faults_case(args: argparse.Namespace, work: Path) -> int:
    stack, ports = one_node_stack(work, args.ext_proc_workers)
    states: list[str] = []
    try:
        edge = stack.edges[0]
        with Load([edge.edge_port], args.clients) as load:
            phases = Phases(load, [edge.admin], PROVIDERS, extra={
                "ext_proc refused": f"{EXT_PROC_FILTER}immediate_responses_sent",
            })

            def phase(name: str) -> None:
                phases.run(name, args.phase)
                states.append(f"{name.strip():<36} {fleet_states(stack)}")

            phase("before any fault")
            for label, fault in FAULTS:
                target = winner(load)
                sim_control(ports[target], "fault", fault)
                phase(f"{label} on {target}")
                sim_control(ports[target], "reset")
                phase("  cleared")
            for name in PROVIDERS:
                sim_control(ports[name], "fault", {"mode": "error", "status": 503})
            phase("503 on every provider")
            for name in PROVIDERS:
                sim_control(ports[name], "reset")
            phase("  cleared")
    finally:
        stack.stop()
    print(f"faults: {args.clients} clients, one Envoy node, {args.phase:.0f} s per phase")
    print(phases.report())
    print("control plane's provider states at the end of each phase:")
    print("\n".join(states))
    return 0


def ext_proc_flags(admin: EnvoyAdmin) -> list[str]:
    prefix = f"{EXT_PROC_CLUSTER}::"
    return [line.rsplit("::", 1)[1] for line in admin.clusters().splitlines()
            if line.startswith(prefix) and "::health_flags::" in line]


def wait_for(check: Callable[[], bool], limit_s: float) -> float | None:
    """Poll `check` every 10 ms for up to `limit_s`; the time it first held, or None."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(0.01)
    return None


def freeze_case(args: argparse.Namespace, work: Path) -> int:
    stack, _ = one_node_stack(work, args.ext_proc_workers)
    admin = stack.edges[0].admin
    group = stack.processes["ext-proc-1"].pid
    try:
        with Load([stack.edges[0].edge_port], args.clients) as load:
            phases = Phases(load, [admin], PROVIDERS, extra={
                "message timeouts": f"{EXT_PROC_FILTER}message_timeouts",
                "fallback route": f"{EXT_PROC_FILTER}failure_mode_allowed",
            })
            phases.run("before", args.phase)
            frozen_at = time.monotonic()
            os.killpg(group, signal.SIGSTOP)
            try:
                detected_at = wait_for(lambda: "healthy" not in ext_proc_flags(admin), args.freeze)
                phases.mark("frozen, not yet detected")
                time.sleep(max(0.0, frozen_at + args.freeze - time.monotonic()))
                phases.mark("frozen, /failed_active_hc")
            finally:
                os.killpg(group, signal.SIGCONT)
            resumed_at = time.monotonic()
            healthy_at = wait_for(lambda: ext_proc_flags(admin) == ["healthy"], 10.0)
            phases.mark("resumed, not yet healthy")
            phases.run("after", args.phase)
    finally:
        stack.stop()
    print(f"freeze: {args.clients} clients, ext_proc frozen (SIGSTOP) {args.freeze:.0f} s")
    if detected_at is not None:
        print(f"SIGSTOP -> Envoy marks ext_proc unhealthy: "
              f"{(detected_at - frozen_at) * 1000:.0f} ms")
    if healthy_at is not None:
        print(f"SIGCONT -> healthy again: {(healthy_at - resumed_at) * 1000:.0f} ms")
    print(phases.report())
    return 0


def attempts_to(stack: Stack, provider: str) -> list[int]:
    """Per node, requests its Envoy has sent (or tried to send) to `provider`'s cluster."""
    counts = []
    for edge in stack.edges:
        stats = edge.admin.stats(f"cluster.{provider}.")
        counts.append(stats.get(f"cluster.{provider}.upstream_rq_total", 0)
                      + stats.get(f"cluster.{provider}.upstream_cx_connect_fail", 0))
    return counts


def kill_case(args: argparse.Namespace, work: Path) -> int:
    policy, ports = fleet_policy(work / "policy.yaml")
    sims = {name: python_module(f"sim-{name}", "simulator",
                                ["--policy", str(policy), "--only", name], work).start()
            for name in PROVIDERS}
    stack = None
    try:
        for name, sim in sims.items():
            sim.wait_until(lambda port=ports[name]: port_open(port), f"sim {name}")
        stack = Stack(policy=policy, log_dir=work, ports=StackPorts.free(), simulators=False,
                      edge_nodes=2, ext_proc_replicas=2, accounting=["--no-accounting"]).start()
        with Load([edge.edge_port for edge in stack.edges], 2 * len(stack.edges)) as load:
            time.sleep(args.quiet)
            killed_at = time.monotonic()
            at_kill = attempts_to(stack, VICTIM)
            sims[VICTIM].kill()
            ejected_at, at_ejection, last_change, previous = None, None, killed_at, at_kill
            while time.monotonic() < killed_at + args.failover:
                now_counts = attempts_to(stack, VICTIM)
                if now_counts != previous:
                    last_change, previous = time.monotonic(), now_counts
                if ejected_at is None:
                    health = json.loads(stack.control_get("/v1/health")[1])
                    if health["providers"].get(VICTIM, {}).get("state") == "ejected":
                        ejected_at, at_ejection = time.monotonic(), now_counts
                time.sleep(0.02)
        at_end = attempts_to(stack, VICTIM)
    finally:
        if stack is not None:
            stack.stop()
        for sim in sims.values():
            sim.stop()

    errors = sum(1 for s in load.samples if s.status != 200)
    print(f"kill: requests {len(load.samples)}, client errors: {errors}")
    at_ejection = at_ejection or at_end
    for index, edge in enumerate(stack.edges):
        print(f"{edge.node_id}: attempts to {VICTIM} after the kill: "
              f"{at_ejection[index] - at_kill[index]} before the control plane ejected it, "
              f"{at_end[index] - at_ejection[index]} after")
    if ejected_at is not None:
        print(f"kill -> control plane ejected {VICTIM}: {(ejected_at - killed_at) * 1000:.0f} ms")
    print(f"kill -> last attempt any node sent to {VICTIM}: "
          f"{(last_change - killed_at) * 1000:.0f} ms")
    for name, start, end in (("quiet", killed_at - args.quiet, killed_at),
                             ("failover", killed_at, killed_at + args.failover)):
        latencies = [s.latency_s for s in load.window(start, end)]
        print(f"{name:<9} requests {len(latencies):5d}  p50 {percentile_ms(latencies, 50):7.2f} ms"
              f"  p99 {percentile_ms(latencies, 99):7.2f} ms")
    return 0 if errors == 0 else 1


CASES = {"kill": kill_case, "faults": faults_case, "freeze": freeze_case}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    option = parser.add_argument
    option("--case", nargs="+", choices=list(CASES), default=list(CASES))
    option("--quiet", type=float, default=8.0, help="kill: seconds of load before the kill")
    option("--failover", type=float, default=8.0, help="kill: seconds of load after it")
    option("--clients", type=int, default=64, help="faults, freeze: concurrent clients")
    option("--phase", type=float, default=3.0, help="faults, freeze: seconds per phase")
    option("--freeze", type=float, default=5.0, help="freeze: seconds ext_proc is stopped")
    option("--ext-proc-workers", type=int, default=1, help="faults, freeze")
    args = parser.parse_args()
    status = 0
    for case in args.case:
        work = Path(tempfile.mkdtemp(prefix=f"gpu-router-{case}-"))
        status |= CASES[case](args, work)
        print()
    return status


if __name__ == "__main__":
    sys.exit(main())
