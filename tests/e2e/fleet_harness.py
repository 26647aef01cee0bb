"""A fleet on one machine for the fault tests: Envoy node(s), ext_proc replica(s), one control
plane, and three simulated providers, one process each so that one can be hard down."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from polling import eventually
from stack_harness import Providers, Traffic, start_stack

from control_plane.policy.load import default_policy_path
from gpu_router.processes import ManagedProcess, free_port, port_open, python_module
from gpu_router.stack import Stack

PROVIDERS = ("lambda", "coreweave", "runpod")
"""Under BATCH (cost-first), runpod ($0.10) wins, then lambda ($0.25), then coreweave ($0.30)."""
HEALTH_TYPE = "type.googleapis.com/gpu_router.api.v1.HealthSnapshot"


def fleet_policy(path: Path) -> Path:
    """The default policy's three providers above, on free ports, with a 1 s per-try timeout
    (a hung provider is left after a second)."""
    document = yaml.safe_load(default_policy_path().read_text())
    document["providers"] = [p for p in document["providers"] if p["name"] in PROVIDERS]
    for provider in document["providers"]:
        provider["base_url"] = f"http://127.0.0.1:{free_port()}"
    for policy in document["policies"]:
        policy["per_try_timeout_ms"] = 1000
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


class Fleet:
    def __init__(self, stack: Stack, sims: dict[str, ManagedProcess]) -> None:
        self.stack, self.sims, self.providers = stack, sims, Providers(stack.policy)

    @property
    def edges(self) -> list:
        return list(self.stack.edges)

    def health(self) -> dict:
        return json.loads(self.stack.control_get("/v1/health")[1])

    def state(self, provider: str) -> str:
        return self.health()["providers"].get(provider, {}).get("state", "healthy")

    def health_delivered(self, version: int) -> bool:
        """Fleet health `version` (or later) was published, and every ext_proc worker ACKed
        what the control plane serves now."""
        if (self.health()["published_version"] or 0) < version:
            return False
        workers = [n for n in self.stack.control.xds_nodes()
                   if n["cluster"] == "gpu-router-ext-proc"]
        states = [n["types"].get(HEALTH_TYPE) for n in workers]
        return bool(workers) and all(
            s is not None and s["acked_version"] == s["current_version"] != "" for s in states)

    def healthy(self, provider: str) -> bool:
        """The provider-wide entry and every per-model entry: ext_proc skips a candidate
        that either of them ejects, and their cooldowns end at different times."""
        entry = self.health()["providers"].get(provider, {})
        states = [entry.get("state", "healthy")] + [m["state"] for m in entry.get("models", {}).values()]
        return set(states) <= {"healthy"}

    def outlier_5xx(self, provider: str) -> list[int | None]:
        """consecutive_5xx of the provider's active cluster on each Envoy node."""
        found = []
        for edge in self.edges:
            configs = edge.admin.config_dump("dynamic_active_clusters").get("configs", [])
            clusters = {c["cluster"]["name"]: c["cluster"] for c in configs}
            detection = clusters.get(provider, {}).get("outlier_detection", {})
            found.append(detection.get("consecutive_5xx"))
        return found

    def overflows(self) -> list[dict[str, int]]:
        """Each node's non-zero retry and overflow counters of the provider clusters: why a
        request that should have failed over reached the client."""
        wanted = ("retry", "overflow")
        return [{name: value for name, value in edge.admin.stats("cluster.").items()
                 if value and any(w in name for w in wanted) and name.split(".")[1] in PROVIDERS}
                for edge in self.edges]

    def recovered(self, provider: str) -> None:
        """Healthy again at the control plane, and that news delivered to every ext_proc worker
        (they pick on what they were sent, which trails the control plane by a publish)."""
        eventually(lambda: self.healthy(provider), f"{provider} to recover", timeout=40)
        version = self.health()["version"]
        eventually(lambda: self.health_delivered(version), f"{provider}'s recovery to reach ext_proc")


@contextmanager
def running_fleet(directory: Path, **stack: int) -> Iterator[Fleet]:
    """A fleet under `directory`; `stack` sizes it (edge_nodes, ext_proc_replicas)."""
    policy = fleet_policy(directory / "policy.yaml")
    sims: dict[str, ManagedProcess] = {}
    try:
        for name in PROVIDERS:
            sims[name] = python_module(f"sim-{name}", "simulator", ["--policy", str(policy), "--only", name],
                                       directory / "logs").start()
        urls = Providers(policy).urls
        for name, sim in sims.items():
            port = int(urls[name].rsplit(":", 1)[1])
            sim.wait_until(lambda port=port: port_open(port), f"sim {name} to listen")
        running = start_stack(policy, directory / "logs", simulators=False, **stack)
        try:
            yield Fleet(running, sims)
        finally:
            running.stop()
    finally:
        for sim in sims.values():
            sim.stop()


def phase(name: str) -> None:
    """Printed with its time: pytest shows it next to a failure's timestamps."""
    print(time.strftime("%H:%M:%S"), name)


def hold(traffic: Traffic, served: Callable[[], int], at_least: int) -> None:
    """Keep the load on until `served` has grown by `at_least` more requests."""
    start = served()
    eventually(lambda: served() - start >= at_least, "more requests to complete", timeout=120)
