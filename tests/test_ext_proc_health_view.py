"""HealthView: per-model latency with provider-wide fallback, degraded/ejected from either entry."""

from __future__ import annotations

import math

import pytest
from ext_proc_fixtures import default_policy, health_entry, snapshot

from ext_proc.health_view import (
    EMPTY_HEALTH,
    NOT_EJECTED,
    UNTIL_NEXT_SNAPSHOT,
    build_health_view,
)
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


def test_degraded_when_the_model_or_the_provider_entry_says_so() -> None:
    view = build_health_view(
        snapshot(
            health_entry("vast", "", state=health_pb2.DEGRADED),
            health_entry("vast", "bge-large", state=health_pb2.EJECTED, cooldown_until_unix_ms=5),
            health_entry("lambda", "llama-3.1-8b", state=health_pb2.DEGRADED),
        )
    )
    assert view.degraded("vast", "bge-large")  # still degraded once the ejection ends
    assert view.degraded("lambda", "llama-3.1-8b")
    assert not view.degraded("lambda", "mixtral-8x7b")
    assert view.ejected_until("vast", "bge-large") == 5
    assert view.ejected_until("vast", "llama-3.1-8b") == NOT_EJECTED


@pytest.mark.parametrize(
    ("model_cooldown", "provider_cooldown", "until"),
    [
        (5, 9, 9),  # a provider-wide Retry-After outlasting the model's ejection
        (9, 5, 9),
        (0, 9, UNTIL_NEXT_SNAPSHOT),
        (9, 0, UNTIL_NEXT_SNAPSHOT),
        (None, 9, 9),
        (9, None, 9),
    ],
)
def test_the_later_of_the_model_and_provider_wide_ejections_holds(
    model_cooldown: int | None, provider_cooldown: int | None, until: int
) -> None:
    def entry(model: str, cooldown: int | None) -> health_pb2.ProviderHealth:
        if cooldown is None:
            return health_entry("vast", model, latency_ms=10.0)
        return health_entry(
            "vast", model, state=health_pb2.EJECTED, cooldown_until_unix_ms=cooldown
        )

    view = build_health_view(
        snapshot(entry("bge-large", model_cooldown), entry("", provider_cooldown))
    )
    assert view.ejected_until("vast", "bge-large") == until
    route = build_routing_table(default_policy()).models["bge-large"]  # coreweave, vast
    assert view.align(route).ejected(now_unix_ms=8).tolist() == [False, True]


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


def test_the_view_keeps_each_edge_s_providers_at_their_cap() -> None:
    message = snapshot()
    message.at_cap.add(edge="edge-1", providers=["vast", "runpod"])
    view = build_health_view(message)
    assert view.at_cap == {"edge-1": frozenset({"vast", "runpod"})}
    assert build_health_view(snapshot()).at_cap == {}
