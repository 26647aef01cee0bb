"""HealthView: per-model latency with provider-wide fallback, worst state wins, aligned arrays."""

from __future__ import annotations

import math

from ext_proc_fixtures import default_policy, health_entry, snapshot

from ext_proc.health_view import EMPTY_HEALTH, build_health_view
from ext_proc.routing_table import build_routing_table
from gpu_router.api.v1 import health_pb2


def test_latency_falls_back_from_model_to_provider_to_unmeasured() -> None:
    view = build_health_view(
        snapshot(
            health_entry("lambda", "llama-3.1-8b", 42.0),
            health_entry("lambda", "", 90.0),
            health_entry("vast", "llama-3.1-8b", None),
        )
    )
    assert view.latency_ms("lambda", "llama-3.1-8b") == 42.0
    assert view.latency_ms("lambda", "mixtral-8x7b") == 90.0
    assert view.latency_ms("vast", "llama-3.1-8b") is None
    assert view.latency_ms("nobody", "llama-3.1-8b") is None


def test_the_worse_of_model_and_provider_state_wins() -> None:
    view = build_health_view(
        snapshot(
            health_entry("vast", "", state=health_pb2.DEGRADED),
            health_entry("vast", "bge-large", state=health_pb2.EJECTED, cooldown_until_unix_ms=5),
            health_entry("lambda", "llama-3.1-8b", state=health_pb2.DEGRADED),
        )
    )
    assert view.state("vast", "bge-large") == (health_pb2.EJECTED, 5)
    assert view.state("vast", "llama-3.1-8b") == (health_pb2.DEGRADED, 0)
    assert view.state("lambda", "mixtral-8x7b") == (health_pb2.HEALTHY, 0)


def test_aligned_arrays_follow_the_route() -> None:
    table = build_routing_table(default_policy())
    view = build_health_view(
        snapshot(
            health_entry("runpod", latency_ms=7.0),
            health_entry("lambda", state=health_pb2.EJECTED, cooldown_until_unix_ms=100),
        )
    )
    aligned = view.align_table(table)["mixtral-8x7b"]  # lambda, vast, runpod
    assert [None if math.isnan(v) else v for v in aligned.latency_ms.tolist()] == [None, None, 7.0]
    assert aligned.ejected(now_unix_ms=99).tolist() == [True, False, False]
    assert aligned.ejected(now_unix_ms=100).tolist() == [False, False, False]
    assert EMPTY_HEALTH.align(table.models["bge-large"]).degraded.tolist() == [False, False]
