"""Editing the watched policy file changes routing with no restart and no failed request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from polling import eventually
from stack_harness import CLIENTS, Providers, Traffic, chat, policy_version, replace_file

from control_plane.policy.load import load_policy_text
from gpu_router.stack import Stack


def edit_policy(path: Path, change) -> None:
    document = yaml.safe_load(path.read_text())
    change(document)
    replace_file(path, yaml.safe_dump(document, sort_keys=False))


def provider(document: dict, name: str) -> dict:
    return next(p for p in document["providers"] if p["name"] == name)


@pytest.fixture
def original_policy(stack: Stack) -> Iterator[str]:
    text = stack.policy.read_text()
    yield text
    replace_file(stack.policy, text)


def test_removing_a_provider_moves_traffic_without_failing_in_flight_requests(
    stack: Stack, providers: Providers, original_policy: str
) -> None:
    providers.latency("runpod", 300)  # keep requests in flight while the policy changes
    batch = {"x-workload": "batch"}
    with Traffic(stack, "mixtral-8x7b", batch, threads=CLIENTS) as traffic:
        eventually(lambda: traffic.count("runpod") >= 4, "traffic to runpod")
        edit_policy(stack.policy, lambda d: d["providers"].remove(provider(d, "runpod")))
        eventually(lambda: traffic.count("lambda") >= 8, "traffic to move to lambda")

    assert traffic.failures() == {}, traffic.failed
    status, headers, _ = chat(stack, "mixtral-8x7b", batch)
    assert (status, headers["x-gpu-router-provider"]) == (200, "lambda")
    assert "runpod" not in stack.edges[0].admin.clusters()


def test_a_price_change_reroutes_without_restart(
    stack: Stack, providers: Providers, original_policy: str
) -> None:
    replace_file(stack.policy, original_policy)
    eventually(lambda: chat(stack, "llama-3.1-70b", {"x-workload": "batch"})[1].get("x-gpu-router-provider")
               == "coreweave", "the original policy to be back")
    envoy_pid = stack.edges[0].process.pid

    with Traffic(stack, "llama-3.1-70b", {"x-workload": "batch"}, threads=CLIENTS) as traffic:
        edit_policy(stack.policy, lambda d: provider(d, "coreweave")["models"][0]["price"].update(input=9.0))
        eventually(lambda: traffic.count("lambda") >= 8, "cost-first to move to lambda")

    assert traffic.failures() == {}, traffic.failed
    assert stack.edges[0].process.pid == envoy_pid and stack.edges[0].process.alive()


def test_an_invalid_edit_is_rejected_and_routing_stays(
    stack: Stack, providers: Providers, original_policy: str
) -> None:
    replace_file(stack.policy, original_policy)
    good = load_policy_text(original_policy, str(stack.policy)).version
    eventually(lambda: policy_version(stack) == good, "the original policy to be back")

    edit_policy(stack.policy, lambda d: provider(d, "vast")["models"][0]["price"].update(input=-1))
    log = stack.processes["control-plane"].log_path
    rejected = eventually(
        lambda: [json.loads(line) for line in log.read_text().splitlines()
                 if '"policy_rejected"' in line], "the control plane to reject the edit")

    assert "price" in rejected[-1]["error"] and str(stack.policy) in rejected[-1]["error"]
    assert policy_version(stack) == good
    status, headers, _ = chat(stack, "llama-3.1-8b", {"x-workload": "batch"})
    assert (status, headers["x-gpu-router-provider"]) == (200, "vast")
