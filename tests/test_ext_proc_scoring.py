"""Scoring: strategies, SLA, ceiling, fit, ejection, degradation, ties, fallbacks, reasons."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from ext_proc_fixtures import default_policy, health_entry, snapshot

from ext_proc.health_view import build_health_view
from ext_proc.routing_table import ModelRoute, RoutingTable, build_routing_table
from ext_proc.scoring import (
    Decision,
    NoCandidateError,
    candidate_summary,
    decide,
    estimate_prompt_tokens,
)
from gpu_router.api.v1 import health_pb2

NOW_MS = 1_700_000_000_000
TABLE: RoutingTable = build_routing_table(default_policy())
COST = TABLE.policies[0]  # embeddings: cost, 2000 ms SLA
LATENCY = TABLE.policies[2]  # interactive: latency, $1.00 ceiling
# llama-3.1-8b, 1000 prompt + 256 output tokens: lambda $0.000314, coreweave $0.0003768,
# vast $0.00007048, runpod $0.0001256.


def run(
    strategy: str,
    *entries: health_pb2.ProviderHealth,
    model: str = "llama-3.1-8b",
    policy=None,
    prompt_tokens: int = 1000,
    max_tokens: int = 256,
    full: frozenset[str] = frozenset(),
) -> Decision:
    policy = policy or (LATENCY if strategy == "latency" else COST)
    route = TABLE.models[model]
    health = build_health_view(snapshot(*entries)).align(route)
    return decide(
        route,
        health,
        policy,
        strategy=strategy,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        now_unix_ms=NOW_MS,
        full=full,
    )


def test_prompt_estimate_is_four_bytes_per_token() -> None:
    assert estimate_prompt_tokens(4000) == 1000


def test_cost_picks_the_cheapest_within_the_sla() -> None:
    decision = run("cost")
    assert (decision.provider, decision.cluster, decision.provider_model_id) == (
        "vast",
        "vast",
        "llama3.1:8b",
    )
    assert decision.reason == "cheapest within 2000 ms SLA: $0.000070"
    assert decision.fallbacks == ("runpod", "lambda")
    assert decision.candidates[0].expected_cost_usd == pytest.approx(70.48e-6)
    assert [c.provider for c in decision.candidates] == ["vast", "runpod", "lambda", "coreweave"]


def test_a_provider_the_edge_has_at_its_cap_goes_behind_the_others_but_stays_a_fallback() -> None:
    """Its requests would wait at the edge (provider_cap.py), which no latency shows; waiting
    for it still beats a 503 when the others fail, so it stays among the attempts."""
    decision = run("cost", full=frozenset({"vast"}))  # max_fallbacks 2: three attempts
    assert (decision.provider, decision.fallbacks) == ("runpod", ("lambda", "vast"))
    assert decision.reason == ("cheapest within 2000 ms SLA: $0.000070; vast at max_concurrency: "
                               "runpod first")
    # The audit line's first scored entry is the choice (audit.py reads it so, and why, replay).
    assert decision.candidate_summary.startswith("runpod=")
    assert [c.provider for c in decision.candidates] == ["runpod", "lambda", "vast", "coreweave"]
    # One attempt only: the one not at its cap.
    single = run("cost", full=frozenset({"vast"}), policy=dataclasses.replace(COST, max_fallbacks=0))
    assert (single.provider, single.fallbacks) == ("runpod", ())
    # A provider at its cap that would not go first changes nothing.
    assert run("cost", full=frozenset({"lambda"})) == run("cost")


def test_a_provider_at_its_cap_still_goes_before_an_ejected_one() -> None:
    """At its cap a provider queues the request; ejected, it is failing."""
    others_ejected = [health_entry(p, state=health_pb2.EJECTED, cooldown_until_unix_ms=NOW_MS + 5000)
                      for p in ("runpod", "lambda", "coreweave")]
    decision = run("cost", *others_ejected, full=frozenset({"vast"}),
                   policy=dataclasses.replace(COST, max_fallbacks=3))
    assert decision.provider == "vast"
    assert set(decision.fallbacks) == {"runpod", "lambda", "coreweave"}  # the ejected, last
    assert "max_concurrency" not in decision.reason


def test_when_every_provider_is_at_its_cap_the_order_stays() -> None:
    everyone = frozenset({"vast", "runpod", "lambda", "coreweave"})
    decision = run("cost", full=everyone)
    assert (decision.provider, decision.fallbacks) == ("vast", ("runpod", "lambda"))
    assert decision.reason == "cheapest within 2000 ms SLA: $0.000070"


def test_cost_skips_a_provider_measured_over_the_sla_but_keeps_it_as_a_late_fallback() -> None:
    decision = run(
        "cost",
        health_entry("vast", "llama-3.1-8b", 2500),
        policy=dataclasses.replace(COST, max_fallbacks=3),
    )
    assert decision.provider == "runpod"
    assert decision.fallbacks == ("lambda", "coreweave", "vast")
    assert decision.candidates[-1].expected_latency_ms == 2500


def test_cost_without_anyone_inside_the_sla_takes_the_fastest() -> None:
    decision = run(
        "cost",
        health_entry("lambda", latency_ms=3000),
        health_entry("coreweave", latency_ms=2500),
        health_entry("vast", latency_ms=4000),
        health_entry("runpod", latency_ms=2600),
    )
    assert decision.provider == "coreweave"
    assert decision.reason == "no provider within 2000 ms SLA; fastest: 2500 ms EWMA"
    assert decision.fallbacks == ("runpod", "lambda")


def test_cost_without_an_sla_is_plain_cheapest() -> None:
    decision = run(
        "cost",
        health_entry("vast", latency_ms=9000),
        policy=dataclasses.replace(COST, latency_sla_ms=0),
    )
    assert (decision.provider, decision.reason) == ("vast", "cheapest: $0.000070")


def test_latency_explores_unmeasured_providers_first() -> None:
    decision = run(
        "latency",
        health_entry("lambda", latency_ms=100),
        health_entry("coreweave", latency_ms=80),
        health_entry("vast", latency_ms=300),
    )
    assert (decision.provider, decision.reason) == ("runpod", "unmeasured: exploring")
    assert decision.fallbacks == ("coreweave", "lambda")


def test_latency_picks_the_fastest_measured() -> None:
    decision = run(
        "latency",
        health_entry("lambda", latency_ms=100),
        health_entry("coreweave", latency_ms=80),
        health_entry("vast", latency_ms=300),
        health_entry("runpod", latency_ms=200),
    )
    assert (decision.provider, decision.reason) == ("coreweave", "fastest: 80 ms EWMA")


def test_latency_respects_the_cost_ceiling() -> None:
    decision = run(
        "latency",
        health_entry("lambda", latency_ms=50),
        health_entry("coreweave", latency_ms=40),
        health_entry("vast", latency_ms=300),
        health_entry("runpod", latency_ms=200),
        policy=dataclasses.replace(LATENCY, cost_ceiling_usd_per_mtok=0.2),
    )
    assert (decision.provider, decision.reason) == ("runpod", "fastest: 200 ms EWMA")
    assert decision.fallbacks == ("vast", "coreweave")


def test_latency_over_every_ceiling_takes_the_cheapest() -> None:
    decision = run("latency", policy=dataclasses.replace(LATENCY, cost_ceiling_usd_per_mtok=0.01))
    assert (decision.provider, decision.reason) == (
        "vast",
        "no provider under $0.01/1M ceiling; cheapest: $0.000070",
    )


def test_balanced_scores_unmeasured_at_the_fleet_median() -> None:
    decision = run(
        "balanced",
        health_entry("lambda", latency_ms=100),
        health_entry("coreweave", latency_ms=100),
        health_entry("vast", latency_ms=400),
    )
    assert decision.provider == "runpod"
    assert decision.reason == "balanced: score 1.39 ($0.000126, unmeasured)"
    scores = {c.provider: c.score for c in decision.candidates}
    assert scores["vast"] == pytest.approx(2.5)
    assert scores["lambda"] == pytest.approx(0.5 * 314 / 70.48 + 0.5)


def test_balanced_weights_shift_the_choice() -> None:
    entries = (
        health_entry("lambda", latency_ms=100),
        health_entry("coreweave", latency_ms=120),
        health_entry("vast", latency_ms=900),
        health_entry("runpod", latency_ms=700),
    )
    by_latency = run(
        "balanced", *entries, policy=dataclasses.replace(COST, cost_weight=0.0, latency_weight=1.0)
    )
    by_cost = run(
        "balanced", *entries, policy=dataclasses.replace(COST, cost_weight=1.0, latency_weight=0.0)
    )
    assert (by_latency.provider, by_cost.provider) == ("lambda", "vast")


def test_degraded_scores_double() -> None:
    assert run("cost", health_entry("vast", state=health_pb2.DEGRADED)).provider == "runpod"
    decision = run(
        "cost",
        health_entry("vast", state=health_pb2.DEGRADED),
        health_entry("runpod", state=health_pb2.DEGRADED),
    )
    assert decision.provider == "vast"
    assert decision.reason == "cheapest within 2000 ms SLA: $0.000070 (degraded)"


def test_ejected_cooling_down_is_excluded_until_the_cooldown_ends() -> None:
    cooling = run(
        "cost",
        health_entry("vast", state=health_pb2.EJECTED, cooldown_until_unix_ms=NOW_MS + 1500),
    )
    assert cooling.provider == "runpod"
    assert cooling.fallbacks == ("lambda", "coreweave")  # vast only after every eligible one
    assert cooling.reason == "cheapest within 2000 ms SLA: $0.000126; vast ejected"
    vast = next(c for c in cooling.candidates if c.provider == "vast")
    assert (vast.excluded, vast.score) == ("ejected (cooling down for 1.5 s)", None)
    assert cooling.candidates[-1] == vast
    cooled = run(
        "cost", health_entry("vast", state=health_pb2.EJECTED, cooldown_until_unix_ms=NOW_MS - 1)
    )
    assert (cooled.provider, cooled.reason) == ("vast", "cheapest within 2000 ms SLA: $0.000070")


def test_a_provider_wide_cooldown_takes_it_out_of_the_winner_and_makes_it_the_last_fallback() -> None:
    """A 429's Retry-After reaches ext_proc as the provider-wide entry, EJECTED with a cooldown."""
    retry_after = health_entry(
        "runpod", state=health_pb2.EJECTED, cooldown_until_unix_ms=NOW_MS + 2000
    )
    decision = run("cost", retry_after, health_entry("vast", "llama-3.1-8b", latency_ms=10))
    assert (decision.provider, decision.fallbacks) == ("vast", ("lambda", "coreweave"))
    assert decision.reason == "cheapest within 2000 ms SLA: $0.000070; runpod ejected"
    # Only as the last resort, after every eligible provider failed the same request.
    last_resort = run("cost", retry_after, policy=dataclasses.replace(COST, max_fallbacks=9))
    assert (last_resort.provider, last_resort.fallbacks) == ("vast", ("lambda", "coreweave", "runpod"))


def test_provider_wide_ejection_covers_every_model() -> None:
    decision = run(
        "cost",
        health_entry("vast", state=health_pb2.EJECTED),
        health_entry("vast", "llama-3.1-8b", latency_ms=10),
    )
    assert decision.provider == "runpod"


def test_an_ejected_provider_outside_the_policy_is_not_named_as_skipped() -> None:
    only_vast = dataclasses.replace(COST, providers=frozenset({"vast", "lambda"}))
    decision = run("cost", health_entry("runpod", state=health_pb2.EJECTED), policy=only_vast)
    assert decision.reason == "cheapest within 2000 ms SLA: $0.000070"


def test_gpu_that_does_not_fit_is_never_picked() -> None:
    decision = run("cost", model="mixtral-8x7b")
    assert decision.provider == "runpod"
    assert decision.fallbacks == ("lambda",)
    vast = decision.candidates[-1]
    assert (vast.provider, vast.excluded) == (
        "vast",
        "gpu RTX-4090 (24 GB) too small for mixtral-8x7b (needs 80 GB)",
    )


def test_no_candidate_carries_every_reason() -> None:
    only_vast = dataclasses.replace(COST, providers=frozenset({"vast"}))
    with pytest.raises(NoCandidateError) as caught:
        run("cost", model="mixtral-8x7b", policy=only_vast)
    assert caught.value.reason == (
        f"no provider can serve mixtral-8x7b (lambda: not in policy {COST.name}'s providers; "
        "vast: gpu RTX-4090 (24 GB) too small for mixtral-8x7b (needs 80 GB); "
        f"runpod: not in policy {COST.name}'s providers)"
    )
    assert len(caught.value.candidates) == 3


def test_when_every_fitting_provider_is_ejected_they_are_all_tried_anyway() -> None:
    """A certain 503 helps nobody while one of them may already have recovered (the ejection
    trails the provider by its cooldown): like Envoy's panic threshold, rank them all."""
    decision = run(
        "cost",
        health_entry("lambda", state=health_pb2.EJECTED),
        health_entry("runpod", state=health_pb2.EJECTED),
        model="mixtral-8x7b",
    )
    assert (decision.provider, decision.fallbacks) == ("runpod", ("lambda",))
    assert decision.reason.endswith("; every fitting provider ejected: tried anyway")
    assert "vast=x:gpu RTX-4090" in decision.candidate_summary


def test_ties_go_to_provider_order() -> None:
    decision = run("cost", model="bge-large", prompt_tokens=0, max_tokens=0)
    assert (decision.provider, decision.fallbacks) == ("coreweave", ("vast",))


def test_max_fallbacks_bounds_the_list() -> None:
    assert run("cost", policy=dataclasses.replace(COST, max_fallbacks=0)).fallbacks == ()
    assert len(run("cost", policy=dataclasses.replace(COST, max_fallbacks=9)).fallbacks) == 3


def test_the_policys_provider_allow_list_excludes_the_rest_with_the_reason() -> None:
    only_big_clouds = dataclasses.replace(COST, providers=frozenset({"lambda", "coreweave"}))

    decision = run("cost", policy=only_big_clouds)

    assert decision.provider == "lambda"
    excluded = {c.provider: c.excluded for c in decision.candidates}
    assert excluded["vast"] == excluded["runpod"] == f"not in policy {COST.name}'s providers"
    assert decision.fallbacks == ("coreweave",)


def test_the_candidate_summary_lists_every_candidate_in_rank_order() -> None:
    decision = run(
        "cost",
        health_entry("lambda", state=health_pb2.EJECTED, cooldown_until_unix_ms=NOW_MS + 1500),
    )
    assert decision.candidate_summary == (
        "vast=7.048e-05;runpod=0.0001256;coreweave=0.0003768;"
        "lambda=x:ejected (cooling down for 1.5 s)"
    )
    listed = [entry.partition("=")[0] for entry in decision.candidate_summary.split(";")]
    assert listed == [c.provider for c in decision.candidates]


def test_the_summary_scores_are_the_strategys_and_unfit_gpus_say_why() -> None:
    decision = run("latency", health_entry("lambda", "mixtral-8x7b", 80.5), model="mixtral-8x7b")
    assert decision.candidate_summary == (
        "runpod=0;lambda=80.5;vast=x:gpu RTX-4090 (24 GB) too small for mixtral-8x7b (needs 80 GB)"
    )


def summary_route(*providers: str) -> ModelRoute:
    """A route of those providers: their names are all the candidate summary reads of it."""
    count = len(providers)
    return ModelRoute(
        name="m",
        providers=providers,
        clusters=providers,
        provider_model_ids=providers,
        provider_index=np.arange(count, dtype=np.int64),
        input_usd_per_mtok=np.zeros(count),
        output_usd_per_mtok=np.zeros(count),
        unfit=(None,) * count,
        fits=np.ones(count, dtype=np.bool_),
    )


def test_the_summary_keeps_its_separator_out_of_reasons() -> None:
    summary = candidate_summary(
        summary_route("a", "b", "c"),
        [2, 0, 1],
        [0.5, 1e-9, 0.0],
        [True, False, True],
        lambda i: "one; two" if i == 1 else None,
    )
    assert summary == "c=0;a=0.5;b=x:one, two"


def test_a_percent_sign_in_a_provider_name_is_not_a_format() -> None:
    route = summary_route("50%", "x%s")
    for eligible in (None, [True, True]):  # one format for all, then one per candidate
        summary = candidate_summary(route, [1, 0], [2.5, 1.0], eligible, lambda i: None)
        assert summary == "x%s=1;50%=2.5"
    summary = candidate_summary(route, [0, 1], [1.0, 2.0], [True, False], lambda i: "gone")
    assert summary == "50%=1;x%s=x:gone"


def test_the_control_planes_audit_reads_the_summary_back() -> None:
    """The wire contract with control_plane/audit.py (a test may import both deployables)."""
    from control_plane.audit import parse_candidates

    decision = run("cost", model="mixtral-8x7b")
    assert parse_candidates(decision.candidate_summary) == [
        {"provider": c.provider, "score": pytest.approx(c.score, rel=1e-5)}
        if c.excluded is None
        else {"provider": c.provider, "excluded": c.excluded}
        for c in decision.candidates
    ]
