"""A fleet on one machine: two Envoy nodes, two ext_proc replicas, one control plane and
three simulated providers (one process each, so one can be hard down). Under steady load,
provider failures, ext_proc crashes and a control-plane crash give no failed client request."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import yaml
from polling import eventually
from stack_harness import Providers, Traffic, chat, start_stack

from control_plane.policy.load import default_policy_path
from gpu_router.processes import ManagedProcess, free_port, http_get, port_open, python_module
from gpu_router.stack import Stack

MODEL = "llama-3.1-8b"
BATCH = {"x-workload": "batch"}
"""Cost-first: runpod ($0.10) wins, then lambda ($0.25), then coreweave ($0.30)."""
PROVIDERS = ("lambda", "coreweave", "runpod")
CLIENTS_PER_EDGE = 8
"""Enough concurrent clients per Envoy that failovers run side by side: a retry guard that
refuses retries under load (the old retry budget did, as retry_overflow) fails this test."""
HEALTH_TYPE = "type.googleapis.com/gpu_router.api.v1.HealthSnapshot"


def fleet_policy(path: Path) -> Path:
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
        return json.loads(http_get(self.stack.control_url("/v1/health"))[1])

    def state(self, provider: str) -> str:
        return self.health()["providers"].get(provider, {}).get("state", "healthy")

    def health_delivered(self, version: int) -> bool:
        """Fleet health `version` (or later) was published, and every ext_proc worker ACKed
        what the control plane serves now."""
        if (self.health()["published_version"] or 0) < version:
            return False
        workers = [n for n in self.stack.xds_nodes() if n["cluster"] == "gpu-router-ext-proc"]
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


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("fleet")
    policy = fleet_policy(directory / "policy.yaml")
    sims = {}
    try:
        for name in PROVIDERS:
            sims[name] = python_module(f"sim-{name}", "simulator", ["--policy", str(policy), "--only", name],
                                       directory / "logs").start()
        urls = Providers(policy).urls
        for name, sim in sims.items():
            port = int(urls[name].rsplit(":", 1)[1])
            sim.wait_until(lambda port=port: port_open(port), f"sim {name} to listen")
        stack = start_stack(policy, directory / "logs", simulators=False, edge_nodes=2, ext_proc_replicas=2)
        try:
            yield Fleet(stack, sims)
        finally:
            stack.stop()
    finally:
        for sim in sims.values():
            sim.stop()


def phase(name: str) -> None:
    """Printed with its time: pytest shows it next to a failure's timestamps."""
    print(time.strftime("%H:%M:%S"), name)


def hold(traffic: Traffic, served: Callable[[], int], at_least: int) -> None:
    """Keep the load on until `served` has grown by `at_least` more requests."""
    start = served()
    eventually(lambda: served() - start >= at_least, "more requests to complete", timeout=60)


def test_provider_and_control_failures_never_reach_the_client(fleet: Fleet) -> None:
    fleet.providers.reset_all()
    with Traffic(fleet.edges, MODEL, BATCH, threads=CLIENTS_PER_EDGE * len(fleet.edges)) as traffic:
        total = traffic.total
        hold(traffic, total, 20)

        phase("runpod hard down")
        fleet.sims["runpod"].kill()  # hard down: connection refused
        hold(traffic, total, 40)
        fleet.sims["runpod"].start()
        fleet.recovered("runpod")

        for fault in ({"mode": "error", "status": 503}, {"mode": "rate_limit", "retry_after_s": 2},
                      {"mode": "hang"}):
            phase(f"runpod {fault}")
            fleet.providers.fault("runpod", rate=1.0, **fault)
            hold(traffic, total, 40)
            fleet.providers.call("runpod", "/_sim/reset", {})
            fleet.recovered("runpod")

        phase("ext_proc replicas killed")
        for replica in ("ext-proc-1", "ext-proc-2"):
            fleet.stack.kill(replica)
        hold(traffic, total, 40)
        for replica in ("ext-proc-1", "ext-proc-2"):
            fleet.stack.restart(replica)

        phase("control plane killed")
        fleet.stack.kill("control-plane")
        hold(traffic, total, 40)
        fleet.stack.restart("control-plane")
        hold(traffic, total, 20)

    assert traffic.failures() == {}, (traffic.failed, fleet.overflows())
    served_by = {provider for _, provider in traffic.outcomes}
    assert served_by >= {"runpod", "lambda"}


def test_a_provider_found_bad_behind_node_a_is_avoided_by_node_b(fleet: Fleet) -> None:
    node_a, node_b = fleet.edges
    fleet.providers.reset_all()
    fleet.recovered("runpod")
    fleet.providers.fault("runpod", mode="error", status=503, rate=1.0)

    eventually(lambda: chat(node_a, MODEL, BATCH)[0] == 200 and fleet.state("runpod") == "ejected",
               "node A's traffic to get runpod ejected by the control plane")
    ejected = fleet.health()["version"]
    eventually(lambda: fleet.health_delivered(ejected), "the ejection to reach every ext_proc worker")
    before = fleet.providers.stats("runpod")["requests"]
    outcomes = [chat(node_b, MODEL, BATCH) for _ in range(10)]

    assert [status for status, _, _ in outcomes] == [200] * 10
    assert {headers["x-gpu-router-provider"] for _, headers, _ in outcomes} == {"lambda"}
    assert fleet.providers.stats("runpod")["requests"] == before  # node B never tried it
    # Every node's Envoy now ejects runpod on its first failure, until the fleet finds it healthy.
    eventually(lambda: fleet.outlier_5xx("runpod") == [1, 1], "every Envoy to watch runpod")
    fleet.providers.call("runpod", "/_sim/reset", {})
    fleet.recovered("runpod")
    eventually(lambda: fleet.outlier_5xx("runpod") == [5, 5], "the policy's outlier detection back")


def test_a_stream_fails_over_when_the_provider_fails_before_the_first_byte(fleet: Fleet) -> None:
    fleet.providers.reset_all()
    fleet.recovered("runpod")
    fleet.providers.fault("runpod", mode="reset", rate=1.0)
    client = openai.OpenAI(base_url=f"{fleet.edges[1].url}/v1", api_key="unused", max_retries=0)

    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, stream=True, extra_headers=BATCH)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert text
    assert fleet.providers.stats("runpod")["requests"] >= 1  # the first attempt went there
    fleet.providers.call("runpod", "/_sim/reset", {})
