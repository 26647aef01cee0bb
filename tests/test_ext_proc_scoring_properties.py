"""decide() (plain Python) against the numpy reference it replaced, on random candidates: the same
winner, order, fallbacks, reason, summary and audited candidates, or the same refusal."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scoring_reference import reference_decide

from ext_proc.health_view import NOT_EJECTED, UNTIL_NEXT_SNAPSHOT, CandidateHealth
from ext_proc.routing_table import ModelRoute, PolicyRule
from ext_proc.scoring import Decision, NoCandidateError, decide

NOW_MS = 1_700_000_000_000
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy's inf
# Few distinct values, so ties (and their provider-order break) come up often.
PRICES = st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.2, 0.5, 1.0, 3.0, 12.5])
LATENCIES = st.one_of(st.none(), st.sampled_from([1.0, 40.0, 40.0, 90.0, 250.0, 2500.0]),
                      st.floats(min_value=0.0, max_value=1e5, allow_nan=False))
EJECTIONS = st.sampled_from([NOT_EJECTED, NOT_EJECTED, NOT_EJECTED, UNTIL_NEXT_SNAPSHOT,
                             NOW_MS - 1_000, NOW_MS, NOW_MS + 5_000])


@st.composite
def cases(draw: st.DrawFn, max_candidates: int = 8):
    """Half of the cases are shaped as production runs them: providers in table order (as
    build_routing_table makes them), all fitting, no allow-list, nobody ejected, so every
    candidate is eligible and decide() takes its fast paths (one-key sort, the health
    snapshot's prepared latencies, the one-format summary); the others are anything."""
    n = draw(st.integers(min_value=1, max_value=max_candidates))
    production = draw(st.booleans())
    providers = tuple(f"p{i}" for i in range(n))
    fits = [production or draw(st.booleans()) or draw(st.booleans()) for _ in range(n)]
    route = ModelRoute(
        name="m",
        providers=providers,
        clusters=tuple(f"provider-{p}" for p in providers),
        provider_model_ids=tuple(f"id-{p}" for p in providers),
        provider_index=np.array(range(n) if production else draw(st.permutations(range(n))),
                                dtype=np.int64),
        input_usd_per_mtok=np.array([draw(PRICES) for _ in range(n)], dtype=np.float64),
        output_usd_per_mtok=np.array([draw(PRICES) for _ in range(n)], dtype=np.float64),
        unfit=tuple(None if f else "gpu too small" for f in fits),
        fits=np.array(fits, dtype=np.bool_),
    )
    latency = [draw(LATENCIES) for _ in range(n)]
    health = CandidateHealth(
        latency_ms=np.array([np.nan if v is None else v for v in latency], dtype=np.float64),
        degraded=np.array([draw(st.booleans()) for _ in range(n)], dtype=np.bool_),
        ejected_until_unix_ms=np.array(
            [NOT_EJECTED if production else draw(EJECTIONS) for _ in range(n)], dtype=np.int64),
    )
    policy = PolicyRule(
        name="p",
        strategy="balanced",
        cost_weight=draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])),
        latency_weight=draw(st.sampled_from([0.0, 0.5, 0.7])),
        latency_sla_ms=draw(st.sampled_from([0.0, 50.0, 100.0, 1000.0])),
        cost_ceiling_usd_per_mtok=draw(st.sampled_from([0.0, 0.1, 0.5, 2.0])),
        max_fallbacks=draw(st.integers(min_value=0, max_value=4)),
        providers=frozenset() if production else frozenset(draw(st.sets(st.sampled_from(providers)))),
    )
    request = {
        "strategy": draw(st.sampled_from(["cost", "latency", "balanced"])),
        "prompt_tokens": draw(st.sampled_from([0, 1, 250, 1000, 50_000])),
        "max_tokens": draw(st.sampled_from([0, 16, 256, 4096])),
        "now_unix_ms": NOW_MS,
    }
    return route, health, policy, request


def _outcome(decide_fn, route, health, policy, request) -> tuple:
    try:
        decision: Decision = decide_fn(route, health, policy, **request)
    except NoCandidateError as error:
        return ("refused", error.model, error.reason, error.candidates)
    return ("routed", decision.provider, decision.cluster, decision.provider_model_id,
            decision.model, decision.policy, decision.strategy, decision.reason,
            decision.fallbacks, decision.candidate_summary, decision.candidates)


@settings(max_examples=600, deadline=None)
@given(cases())
def test_the_fast_ranking_decides_as_the_numpy_reference(case) -> None:
    route, health, policy, request = case
    assert _outcome(decide, *case) == _outcome(reference_decide, route, health, policy, request)


@settings(max_examples=60, deadline=None)
@given(cases(max_candidates=50))
def test_the_same_with_many_candidates(case) -> None:
    assert _outcome(decide, *case) == _outcome(reference_decide, *case)
