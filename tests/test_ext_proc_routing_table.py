"""RoutingTable: names and aliases, candidate arrays, hardware fit, policy matching, rejects."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ext_proc_fixtures import default_policy, offering

from ext_proc.routing_table import DEFAULT_POLICY, RoutingTableError, build_routing_table
from gpu_router.api.v1 import routing_pb2


def test_aliases_resolve_to_the_canonical_model() -> None:
    table = build_routing_table(default_policy())
    assert table.resolve("llama3-8b") is table.models["llama-3.1-8b"]
    assert table.resolve("meta-llama/Llama-3.1-8B-Instruct") is table.models["llama-3.1-8b"]
    assert table.resolve("mixtral").name == "mixtral-8x7b"
    assert table.resolve("gpt-4") is None


def test_candidates_are_arrays_in_provider_order() -> None:
    route = build_routing_table(default_policy()).models["llama-3.1-8b"]
    assert route.providers == ("lambda", "coreweave", "vast", "runpod")
    assert route.provider_index.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(route.input_usd_per_mtok, [0.25, 0.30, 0.05, 0.10])
    np.testing.assert_allclose(route.output_usd_per_mtok, [0.25, 0.30, 0.08, 0.10])
    assert route.provider_model_ids[2] == "llama3.1:8b"
    assert route.fits.all()


def test_too_small_gpu_stays_listed_with_the_reason() -> None:
    route = build_routing_table(default_policy()).models["mixtral-8x7b"]
    assert route.providers == ("lambda", "vast", "runpod")
    assert route.fits.tolist() == [True, False, True]
    assert route.unfit[1] == "gpu RTX-4090 (24 GB) too small for mixtral-8x7b (needs 80 GB)"


def test_gpu_types_restrict_on_top_of_memory() -> None:
    policy = default_policy()
    policy.providers[1].gpus.append(routing_pb2.Gpu(type="MI300X", memory_gb=192))
    policy.providers[1].offerings.append(offering("llama-3.1-70b", "amd-70b", "MI300X", 0.5, 0.5))
    route = build_routing_table(policy).models["llama-3.1-70b"]
    assert route.providers == ("lambda", "coreweave", "coreweave")
    assert route.fits.tolist() == [True, True, False]
    assert route.unfit[2] == "gpu MI300X not among llama-3.1-70b's gpu types (H100, A100-80GB)"


def test_policies_match_in_order_with_the_default_last() -> None:
    table = build_routing_table(default_policy())
    assert table.match("/v1/embeddings", {}, "bge-large").name == "embeddings"
    assert (
        table.match("/v1/chat/completions", {"x-workload": "batch"}, "llama-3.1-8b").name == "batch"
    )
    assert (
        table.match("/v1/chat/completions", {"x-workload": "other"}, "llama-3.1-8b").name
        == "interactive"
    )
    assert table.match("/v1/chat/completions", {}, "x").strategy == "latency"
    empty = routing_pb2.RoutingPolicy()
    empty.CopyFrom(default_policy())
    del empty.policies[:]
    assert build_routing_table(empty).match("/v1/completions", {}, "llama-3.1-8b") is DEFAULT_POLICY


def test_policy_model_match_uses_canonical_names() -> None:
    policy = default_policy()
    policy.policies.insert(
        0,
        routing_pb2.Policy(
            name="mixtral-only",
            match=routing_pb2.Match(models=["mixtral"]),
            strategy=routing_pb2.BALANCED,
        ),
    )
    table = build_routing_table(policy)
    assert table.match("/v1/chat/completions", {}, "mixtral-8x7b").name == "mixtral-only"
    assert table.match("/v1/chat/completions", {}, "llama-3.1-8b").name == "interactive"


def test_models_list_is_openai_shaped() -> None:
    body = json.loads(build_routing_table(default_policy()).models_list_body)
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [
        "llama-3.1-8b",
        "mixtral-8x7b",
        "llama-3.1-70b",
        "bge-large",
    ]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda p: p.providers[0].offerings.append(offering("gpt-4", "gpt-4", "H100", 1, 1)),
            "unknown model 'gpt-4'",
        ),
        (
            lambda p: p.providers[0].offerings.append(offering("bge-large", "b", "TPU", 1, 1)),
            "unknown gpu 'TPU'",
        ),
        (lambda p: p.models[1].aliases.append("llama3-8b"), "names both"),
        (
            lambda p: p.providers.append(routing_pb2.Provider(name="vast", cluster="vast")),
            "duplicate provider",
        ),
        (lambda p: setattr(p.providers[0], "cluster", ""), "has no cluster"),
        (lambda p: p.policies[0].match.models.append("nope"), "unknown models"),
        (lambda p: setattr(p.policies[0], "strategy", 42), "unknown strategy"),
    ],
)
def test_inconsistent_policies_are_rejected(mutate, message: str) -> None:
    policy = default_policy()
    mutate(policy)
    with pytest.raises(RoutingTableError, match=message):
        build_routing_table(policy)
