"""Failover across the fleet, in one run: two Envoy nodes, two ext_proc replicas, one control
plane, three simulated providers (one process each).

Steady load goes through both nodes. After a quiet period the provider winning every
request (runpod, cost-first) is killed: connections to it are refused. Printed:

- client errors (the target is zero);
- per node, attempts that still reached the dead provider before the control plane
  ejected it and after (from each node's own Envoy admin stats);
- the time from the kill to the last attempt any node sent it (every node stopped picking
  it), and to the control plane's ejection;
- p50/p99 client latency during the failover against the quiet period.

    python bench/failover.py [--quiet 8] [--failover 8]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from control_plane.policy.load import default_policy_path
from gpu_router.processes import free_port, http_get, port_open, python_module
from gpu_router.stack import Stack, StackPorts

MODEL = "llama-3.1-8b"
VICTIM = "runpod"
PROVIDERS = ("lambda", "coreweave", "runpod")
BODY = json.dumps({"model": MODEL, "max_tokens": 8,
                   "messages": [{"role": "user", "content": "hello"}]}).encode()


def fleet_policy(path: Path) -> tuple[Path, dict[str, int]]:
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


class Load:
    """Back-to-back requests per thread over keep-alive connections; (time, latency, status)."""

    def __init__(self, ports: list[int], threads_per_node: int = 2) -> None:
        self.samples: list[tuple[float, float, int]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(port,), daemon=True)
                        for port in ports for _ in range(threads_per_node)]

    def run(self, port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"content-type": "application/json", "x-workload": "batch"}
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                connection.request("POST", "/v1/chat/completions", BODY, headers)
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                status = 0
            with self.lock:
                self.samples.append((started, time.monotonic() - started, status))

    def window(self, start: float, end: float) -> list[tuple[float, float, int]]:
        with self.lock:
            return [s for s in self.samples if start <= s[0] < end]


def attempts_to(stack: Stack, provider: str) -> list[int]:
    """Per node, requests its Envoy has sent (or tried to send) to `provider`'s cluster."""
    counts = []
    for edge in stack.edges:
        stats = edge.admin.stats(f"cluster.{provider}.")
        counts.append(stats.get(f"cluster.{provider}.upstream_rq_total", 0)
                      + stats.get(f"cluster.{provider}.upstream_cx_connect_fail", 0))
    return counts


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) >= 2 else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quiet", type=float, default=8.0, help="seconds of load before the kill")
    parser.add_argument("--failover", type=float, default=8.0, help="seconds of load after it")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gpu-router-failover-"))
    policy, ports = fleet_policy(work / "policy.yaml")
    sims = {name: python_module(f"sim-{name}", "simulator", ["--policy", str(policy), "--only", name],
                                work).start() for name in PROVIDERS}
    stack = None
    try:
        for name, sim in sims.items():
            sim.wait_until(lambda port=ports[name]: port_open(port), f"sim {name}")
        stack = Stack(policy=policy, log_dir=work, ports=StackPorts.free(), simulators=False,
                      edge_nodes=2, ext_proc_replicas=2, accounting=["--no-accounting"]).start()
        load = Load([edge.edge_port for edge in stack.edges])
        for thread in load.threads:
            thread.start()
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
                health = json.loads(http_get(stack.control_url("/v1/health"))[1])
                if health["providers"].get(VICTIM, {}).get("state") == "ejected":
                    ejected_at, at_ejection = time.monotonic(), now_counts
            time.sleep(0.02)
        load.stop.set()
        for thread in load.threads:
            thread.join(timeout=30)
        at_end = attempts_to(stack, VICTIM)
    finally:
        if stack is not None:
            stack.stop()
        for sim in sims.values():
            sim.stop()

    quiet = load.window(killed_at - args.quiet, killed_at)
    failover = load.window(killed_at, killed_at + args.failover)
    errors = sum(1 for *_, status in load.samples if status != 200)
    print(f"requests: {len(load.samples)}, client errors: {errors}")
    at_ejection = at_ejection or at_end
    for index, edge in enumerate(stack.edges):
        print(f"{edge.node_id}: attempts to {VICTIM} after the kill: "
              f"{at_ejection[index] - at_kill[index]} before the control plane ejected it, "
              f"{at_end[index] - at_ejection[index]} after")
    if ejected_at is not None:
        print(f"kill -> control plane ejected {VICTIM}: {(ejected_at - killed_at) * 1000:.0f} ms")
    print(f"kill -> last attempt any node sent to {VICTIM}: {(last_change - killed_at) * 1000:.0f} ms")
    for name, window in (("quiet", quiet), ("failover", failover)):
        latencies = [latency for _, latency, _ in window]
        print(f"{name:<9} requests {len(window):5d}  p50 {percentile(latencies, 50):7.2f} ms"
              f"  p99 {percentile(latencies, 99):7.2f} ms")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
