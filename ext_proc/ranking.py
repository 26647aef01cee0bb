"""The strategies' rankings of a request's candidates, for decide() (scoring.py): per strategy,
which candidates keep its constraint, each one's score (lower ranks first) and the reason for a
winner. Plain Python over the lists decide() prepared and what CandidateHealth prepared once per
snapshot: a model has a few candidates.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ext_proc.routing_table import ModelRoute, PolicyRule

if TYPE_CHECKING:  # not at run time: health_view imports this module (its latency rules)
    from ext_proc.health_view import CandidateHealth

_POSITIVE = (0.0).__lt__


def _positive_min(values: Sequence[float], mask: Sequence[bool] | None) -> float:
    """Smallest positive value under mask (the normaliser of a balanced term), 1.0 if none;
    mask None: every value counts."""
    if mask is None:
        # Usually every value is positive: then their plain minimum (in C) is the one.
        least = min(values, default=1.0)
        return least if least > 0 else min(filter(_POSITIVE, values), default=1.0)
    return min([v for v, m in zip(values, mask) if m and v > 0], default=1.0)


def fmt_latency(latency: float) -> str:
    return "unmeasured" if math.isnan(latency) else f"{latency:.0f} ms EWMA"


Ranking = tuple[Sequence[bool], Sequence[float], Callable[[int], str]]
"""(candidates that keep the strategy's constraint, score, reason for the winner at an index)."""


def _rank_cost(
    route: ModelRoute,
    policy: PolicyRule,
    cost: list[float],
    health: CandidateHealth,
    eligible: Sequence[bool],
    tokens: int,
) -> Ranking:
    sla = policy.latency_sla_ms
    latency = health.latencies
    by_cost = _penalised(cost, health)
    if sla <= 0:
        return eligible, by_cost, lambda i: f"cheapest: ${cost[i]:.6f}"
    keeps = [e and (math.isnan(lat) or lat <= sla) for e, lat in zip(eligible, latency)]
    if any(keeps):
        return keeps, by_cost, lambda i: f"cheapest within {sla:g} ms SLA: ${cost[i]:.6f}"
    return (
        eligible,
        _penalised(latency, health),
        lambda i: f"no provider within {sla:g} ms SLA; fastest: {latency[i]:.0f} ms EWMA",
    )


def _rank_latency(
    route: ModelRoute,
    policy: PolicyRule,
    cost: list[float],
    health: CandidateHealth,
    eligible: Sequence[bool],
    tokens: int,
) -> Ranking:
    ceiling = policy.cost_ceiling_usd_per_mtok
    if ceiling > 0:
        price = [c * 1e6 / tokens for c in cost] if tokens else [i for i, _ in route.prices]
        keeps = [e and p <= ceiling for e, p in zip(eligible, price)]
    else:
        keeps = eligible
    if not any(keeps):
        return (
            eligible,
            _penalised(cost, health),
            lambda i: f"no provider under ${ceiling:g}/1M ceiling; cheapest: ${cost[i]:.6f}",
        )

    def describe(i: int) -> str:
        lat = health.latencies[i]
        return "unmeasured: exploring" if math.isnan(lat) else f"fastest: {lat:.0f} ms EWMA"

    return keeps, _penalised(health.exploring_latencies, health), describe


def _penalised(values: Sequence[float], health: CandidateHealth) -> Sequence[float]:
    """Scores of degraded candidates multiplied by their penalty (as they are when none is)."""
    penalties = health.penalties
    return values if penalties is None else list(map(operator.mul, values, penalties))


def exploring_latencies(latencies: Sequence[float]) -> tuple[float, ...]:
    """Latencies as the latency strategy scores them: unmeasured at 0 ms, so each unmeasured
    candidate is explored once (its reason says so: "unmeasured: exploring")."""
    return tuple(0.0 if math.isnan(lat) else lat for lat in latencies)


def _median(values: list[float]) -> float:
    values.sort()
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def balanced_latency(
    latency: Sequence[float], eligible: Sequence[bool] | None = None
) -> tuple[Sequence[float], float]:
    """Latencies as balanced scores them, unmeasured ones at the median of the eligible measured
    ones (1.0 if none), and their normaliser; `eligible` None: every candidate is (as
    CandidateHealth prepares them, once per snapshot)."""
    isnan = math.isnan
    seen = ([lat for lat in latency if not isnan(lat)] if eligible is None
            else [lat for e, lat in zip(eligible, latency) if e and not isnan(lat)])
    if eligible is None and len(seen) == len(latency):
        filled: Sequence[float] = latency
    else:
        unmeasured_as = _median(seen) if seen else 1.0
        filled = [unmeasured_as if isnan(lat) else lat for lat in latency]
    return filled, _positive_min(filled, eligible)


def _rank_balanced(
    route: ModelRoute,
    policy: PolicyRule,
    cost: list[float],
    health: CandidateHealth,
    eligible: Sequence[bool],
    tokens: int,
) -> Ranking:
    cost_weight, latency_weight = policy.cost_weight, policy.latency_weight
    if cost_weight <= 0 and latency_weight <= 0:
        cost_weight = latency_weight = 0.5
    latency = health.latencies
    mask = None if all(eligible) else eligible
    filled, min_latency = (
        health.balanced_latency if mask is None else balanced_latency(latency, mask))
    min_cost = _positive_min(cost, mask)
    score = _penalised(
        [cost_weight * c / min_cost + latency_weight * f / min_latency
         for c, f in zip(cost, filled)],
        health,
    )

    def describe(i: int) -> str:
        return f"balanced: score {score[i]:.2f} (${cost[i]:.6f}, {fmt_latency(latency[i])})"

    return eligible, score, describe


Ranker = Callable[
    [ModelRoute, PolicyRule, list[float], "CandidateHealth", Sequence[bool], int],
    Ranking,
]
"""Every strategy's ranker takes the same arguments, whether or not it reads each (cost and
balanced ignore the route and the token count latency's ceiling needs): decide() calls any."""
RANKERS: dict[str, Ranker] = {
    "cost": _rank_cost,
    "latency": _rank_latency,
    "balanced": _rank_balanced,
}
"""Strategy name -> ranking; its keys are the strategies a client may ask for."""
