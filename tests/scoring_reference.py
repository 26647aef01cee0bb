"""The numpy ranking ext_proc shipped before decide() went plain Python (issue 11), kept as the
reference the property tests compare the fast ranking with: same candidates, same order,
fallbacks, reason and summary."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from ext_proc.health_view import DEGRADED_PENALTY, NOT_EJECTED, UNTIL_NEXT_SNAPSHOT, CandidateHealth
from ext_proc.ranking import fmt_latency
from ext_proc.routing_table import ModelRoute, PolicyRule
from ext_proc.scoring import (
    EXCLUDED_PREFIX,
    Candidate,
    Decision,
    NoCandidateError,
    _ejection,  # the wording of an exclusion is not what the properties compare
)


def _positive_min(values: npt.NDArray[np.float64], mask: npt.NDArray[np.bool_]) -> float:
    """Smallest positive value under mask (the normaliser of a balanced term), 1.0 if none."""
    chosen = values[mask & (values > 0)]
    return float(chosen.min()) if chosen.size else 1.0


def _allowed(route: ModelRoute, policy: PolicyRule) -> npt.NDArray[np.bool_]:
    if not policy.providers:
        return np.ones(len(route.providers), dtype=np.bool_)
    return np.fromiter(
        (p in policy.providers for p in route.providers), np.bool_, len(route.providers)
    )


def reference_decide(
    route: ModelRoute,
    health: CandidateHealth,
    policy: PolicyRule,
    *,
    strategy: str,
    prompt_tokens: int,
    max_tokens: int,
    now_unix_ms: int,
) -> Decision:
    """Rank the route's candidates for one request; NoCandidateError when none is eligible."""
    if not route.providers:
        raise NoCandidateError(route.name, f"no provider offers {route.name}")
    cost = (prompt_tokens * route.input_usd_per_mtok + max_tokens * route.output_usd_per_mtok) / 1e6
    latency = health.latency_ms
    allowed = _allowed(route, policy)
    panic = not (route.fits & allowed & ~health.ejected(now_unix_ms)).any()
    if panic and (route.fits & allowed).any():
        # Every provider that could serve is ejected. Like Envoy's panic threshold: rank them all
        # and let the request fail over through them, rather than answer a certain 503 while one
        # of them may already have recovered (ejection trails the provider by a cooldown).
        health = replace(health, ejected_until_unix_ms=np.full_like(
            health.ejected_until_unix_ms, NOT_EJECTED))
    else:
        panic = False
    ejected = health.ejected(now_unix_ms)
    eligible = route.fits & ~ejected & allowed
    if not eligible.any():
        excluded = _excluded(route, policy, health, now_unix_ms, allowed)
        detail = "; ".join(f"{p}: {why}" for p, why in zip(route.providers, excluded, strict=True))
        raise NoCandidateError(
            route.name,
            f"no provider can serve {route.name} ({detail})",
            _candidates(route, cost, latency, None, excluded, range(len(excluded))),
        )
    degraded = health.degraded
    penalty = np.where(degraded, DEGRADED_PENALTY, 1.0)
    keeps, score, describe = _RANKERS[strategy](
        route, policy, cost, latency, eligible, penalty, prompt_tokens + max_tokens
    )
    group = np.where(keeps, 0, np.where(eligible, 1, 2))
    order = np.lexsort((route.provider_index, np.where(eligible, score, np.inf), group)).tolist()
    best = order[0]
    reason = describe(best) + (" (degraded)" if degraded[best] else "")
    if panic:
        reason += "; every fitting provider ejected: tried anyway"
    skipped = ejected & route.fits & allowed
    if skipped.any():
        reason += "; " + ", ".join(route.providers[i] for i in np.flatnonzero(skipped)) + " ejected"
    ok = eligible.tolist()
    # Ejected providers that could serve come last, after every eligible one: a fleet ejection
    # trails the provider by its cooldown, and trying one beats failing the client request.
    last_resort = (skipped & ~eligible).tolist()
    ranked_eligible = [i for i in order if ok[i]] + [i for i in order if last_resort[i]]
    summary = _summary(route, policy, health, now_unix_ms, allowed, order, score.tolist(), ok)
    return Decision(
        provider=route.providers[best],
        cluster=route.clusters[best],
        provider_model_id=route.provider_model_ids[best],
        model=route.name,
        policy=policy.name,
        strategy=strategy,
        reason=reason,
        fallbacks=tuple(route.providers[i] for i in ranked_eligible[1 : 1 + policy.max_fallbacks]),
        candidate_summary=summary,
        audit=functools.partial(
            _audited, route, policy, cost, latency, score, health, now_unix_ms, allowed, order
        ),
    )


def _summary(
    route: ModelRoute,
    policy: PolicyRule,
    health: CandidateHealth,
    now_unix_ms: int,
    allowed: npt.NDArray[np.bool_],
    order: list[int],
    score: list[float],
    eligible: list[bool],
) -> str:
    """The candidate summary one candidate at a time, as scoring.candidate_summary wrote it before
    it formatted the whole line at once."""
    return ";".join(
        f"{route.providers[i]}={score[i]:.6g}" if eligible[i] else
        f"{route.providers[i]}={EXCLUDED_PREFIX}"
        f"{(_exclusion(route, policy, health, now_unix_ms, allowed, i) or '').replace(';', ',')}"
        for i in order
    )


def _exclusion(
    route: ModelRoute,
    policy: PolicyRule,
    health: CandidateHealth,
    now_unix_ms: int,
    allowed: npt.NDArray[np.bool_],
    i: int,
) -> str | None:
    """Why candidate `i` cannot be used (None when it can)."""
    unfit = route.unfit[i]
    if unfit is not None:
        return unfit
    until = int(health.ejected_until_unix_ms[i])
    if until == UNTIL_NEXT_SNAPSHOT or until > now_unix_ms:
        return _ejection(until, now_unix_ms)
    return None if allowed[i] else f"not in policy {policy.name}'s providers"


def _excluded(
    route: ModelRoute,
    policy: PolicyRule,
    health: CandidateHealth,
    now_unix_ms: int,
    allowed: npt.NDArray[np.bool_],
) -> list[str | None]:
    """Why each candidate cannot be used (None when it can)."""
    return [
        _exclusion(route, policy, health, now_unix_ms, allowed, i)
        for i in range(len(route.providers))
    ]


def _audited(
    route: ModelRoute,
    policy: PolicyRule,
    cost: npt.NDArray[np.float64],
    latency: npt.NDArray[np.float64],
    score: npt.NDArray[np.float64],
    health: CandidateHealth,
    now_unix_ms: int,
    allowed: npt.NDArray[np.bool_],
    order: list[int],
) -> tuple[Candidate, ...]:
    excluded = _excluded(route, policy, health, now_unix_ms, allowed)
    return _candidates(route, cost, latency, score, excluded, order)


Ranking = tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64], Callable[[int], str]]
"""(candidates that keep the strategy's constraint, score, reason for the winner at an index)."""


def _rank_cost(
    route: ModelRoute,
    policy: PolicyRule,
    cost: npt.NDArray[np.float64],
    latency: npt.NDArray[np.float64],
    eligible: npt.NDArray[np.bool_],
    penalty: npt.NDArray[np.float64],
    tokens: int,
) -> Ranking:
    sla = policy.latency_sla_ms
    if sla <= 0:
        return eligible, cost * penalty, lambda i: f"cheapest: ${cost[i]:.6f}"
    keeps = eligible & (np.isnan(latency) | (latency <= sla))
    if keeps.any():
        return keeps, cost * penalty, lambda i: f"cheapest within {sla:g} ms SLA: ${cost[i]:.6f}"
    return (
        eligible,
        latency * penalty,
        lambda i: f"no provider within {sla:g} ms SLA; fastest: {latency[i]:.0f} ms EWMA",
    )


def _rank_latency(
    route: ModelRoute,
    policy: PolicyRule,
    cost: npt.NDArray[np.float64],
    latency: npt.NDArray[np.float64],
    eligible: npt.NDArray[np.bool_],
    penalty: npt.NDArray[np.float64],
    tokens: int,
) -> Ranking:
    ceiling = policy.cost_ceiling_usd_per_mtok
    price = cost * 1e6 / tokens if tokens else route.input_usd_per_mtok
    keeps = eligible & (price <= ceiling) if ceiling > 0 else eligible
    if not keeps.any():
        return (
            eligible,
            cost * penalty,
            lambda i: f"no provider under ${ceiling:g}/1M ceiling; cheapest: ${cost[i]:.6f}",
        )
    measured = ~np.isnan(latency)

    def describe(i: int) -> str:
        return f"fastest: {latency[i]:.0f} ms EWMA" if measured[i] else "unmeasured: exploring"

    return keeps, np.where(measured, latency, 0.0) * penalty, describe


def _rank_balanced(
    route: ModelRoute,
    policy: PolicyRule,
    cost: npt.NDArray[np.float64],
    latency: npt.NDArray[np.float64],
    eligible: npt.NDArray[np.bool_],
    penalty: npt.NDArray[np.float64],
    tokens: int,
) -> Ranking:
    cost_weight, latency_weight = policy.cost_weight, policy.latency_weight
    if cost_weight <= 0 and latency_weight <= 0:
        cost_weight = latency_weight = 0.5
    measured = ~np.isnan(latency)
    seen = eligible & measured
    unmeasured_as = float(np.median(latency[seen])) if seen.any() else 1.0
    filled = np.where(measured, latency, unmeasured_as)
    score = (
        cost_weight * cost / _positive_min(cost, eligible)
        + latency_weight * filled / _positive_min(filled, eligible)
    ) * penalty

    def describe(i: int) -> str:
        return f"balanced: score {score[i]:.2f} (${cost[i]:.6f}, {fmt_latency(latency[i])})"

    return eligible, score, describe


_RANKERS: dict[str, Callable[..., Ranking]] = {
    "cost": _rank_cost,
    "latency": _rank_latency,
    "balanced": _rank_balanced,
}
"""Strategy name -> ranking; its keys are the strategies a client may ask for."""


def _candidates(
    route: ModelRoute,
    cost: npt.NDArray[np.float64],
    latency: npt.NDArray[np.float64],
    score: npt.NDArray[np.float64] | None,
    excluded: list[str | None],
    order: range | list[int],
) -> tuple[Candidate, ...]:
    return tuple(
        Candidate(
            provider=route.providers[i],
            cluster=route.clusters[i],
            provider_model_id=route.provider_model_ids[i],
            expected_cost_usd=float(cost[i]),
            expected_latency_ms=None if np.isnan(latency[i]) else float(latency[i]),
            score=None if score is None or excluded[i] is not None else float(score[i]),
            excluded=excluded[i],
        )
        for i in order
    )
