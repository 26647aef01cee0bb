"""RoutingConfig -> RoutingPolicy: what ext_proc receives over xDS."""

from __future__ import annotations

from pathlib import Path

import pytest
from policy_fixtures import load_valid

from control_plane.policy.load import default_policy_path, load_policy_file
from control_plane.policy.wire import to_routing_policy
from gpu_router.api.v1 import routing_pb2


def test_valid_policy_on_the_wire(tmp_path: Path) -> None:
    config = load_valid(tmp_path)
    wire = to_routing_policy(config)

    assert wire.version == config.version
    alpha, beta = wire.providers
    assert (alpha.name, alpha.cluster, alpha.max_concurrency) == ("alpha", "alpha", 16)
    assert (beta.name, beta.cluster, beta.max_concurrency) == ("beta", "beta", 64)
    assert [(g.type, g.memory_gb) for g in alpha.gpus] == [("H100", 80.0), ("L4", 24.0)]
    assert [(o.model, o.provider_model_id, o.gpu, o.input_usd_per_mtok, o.output_usd_per_mtok)
            for o in alpha.offerings] == [("big", "org/big-model", "H100", 1.0, 2.0),
                                          ("small", "small-alias", "L4", 0.1, 0.2)]

    big, small = wire.models
    assert (big.name, list(big.gpu_types), big.min_gpu_memory_gb) == ("big", ["H100"], 80.0)
    assert (small.name, list(small.aliases)) == ("small", ["small-alias"])

    batch, fast, default = wire.policies
    assert batch.match.path_prefix == "/v1/batch"
    assert dict(batch.match.headers) == {"x-workload": "batch"}
    assert list(batch.match.models) == ["small"]
    assert (batch.strategy, batch.latency_sla_ms, batch.max_fallbacks) == (
        routing_pb2.COST, 5000.0, 1)
    assert (fast.strategy, fast.cost_ceiling_usd_per_mtok) == (routing_pb2.LATENCY, 1.5)
    assert (default.strategy, default.cost_weight, default.latency_weight) == (
        routing_pb2.BALANCED, 1.0, 3.0)
    assert default.match == routing_pb2.Match()


def test_no_base_url_or_credential_reaches_the_wire(tmp_path: Path) -> None:
    data = to_routing_policy(load_valid(tmp_path)).SerializeToString()
    for secret_ish in (b"alpha.example.com", b"ALPHA_KEY", b"127.0.0.1", b"Bearer"):
        assert secret_ish not in data


@pytest.mark.parametrize("path", [default_policy_path(),
                                  Path(__file__).resolve().parents[1] / "examples/policy.yaml"])
def test_round_trip_through_bytes(path: Path) -> None:
    config = load_policy_file(path)
    wire = to_routing_policy(config)
    parsed = routing_pb2.RoutingPolicy.FromString(wire.SerializeToString())
    assert parsed == wire
    assert [p.name for p in parsed.providers] == [p.name for p in config.providers]
    assert [m.name for m in parsed.models] == [m.name for m in config.models]
    assert [(p.name, routing_pb2.Strategy.Name(p.strategy).lower()) for p in parsed.policies] == [
        (p.name, p.strategy.value) for p in config.policies]
    assert sum(len(p.offerings) for p in parsed.providers) == sum(
        len(p.offerings) for p in config.providers)



def test_optional_prices_are_set_only_when_listed(tmp_path: Path) -> None:
    alpha, beta = to_routing_policy(load_valid(tmp_path)).providers
    big = alpha.offerings[0]
    assert (big.cached_input_usd_per_mtok, big.reasoning_usd_per_mtok) == (0.25, 2.5)
    assert not big.HasField("cache_write_usd_per_mtok")
    small = beta.offerings[0]
    assert not any(small.HasField(name) for name in (
        "cached_input_usd_per_mtok", "cache_write_usd_per_mtok", "reasoning_usd_per_mtok"))
