"""Picks a provider for one request: pure, in plain Python over lists prepared once per
routing table and health snapshot (ModelRoute.prices, CandidateHealth.latencies, ...): a model
has a few candidates, where numpy's per-call overhead would cost more than the ranking.

Every candidate gets an expected cost for this request and, where measured, an
expected latency. Ineligible candidates (GPU does not fit, ejected and cooling
down, not in the policy's providers) are kept with the reason, for the audit trail,
and are neither the winner nor a fallback. The strategy ranks the rest:

- cost: cheapest among those inside the latency SLA (unmeasured counts as inside);
  when none is inside, the fastest measured one.
- latency: fastest among those whose price for this request is under the cost
  ceiling; unmeasured candidates score 0 ms so each is explored once. When none
  is under the ceiling, the cheapest.
- balanced: cost_weight * cost / min_cost + latency_weight * latency / min_latency.

DEGRADED candidates score double. Ejected candidates that fit and are allowed are the last
fallbacks, after every eligible one; when all of them are ejected they are ranked as if none were
(a panic mode, like Envoy's panic threshold): the request fails over through them instead of
getting a certain 503. Candidates that break the constraint rank after
those that keep it (they are still fallbacks); ties go to provider order. The
reason names the winner's merit and, when the fleet ejected a candidate that would
otherwise have competed, that it was skipped. When the request's edge has the winner at its
max_concurrency (`full`), the eligible ones not at their cap go first (_spill), and the reason
says so.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from ext_proc.health_view import NOT_EJECTED, UNTIL_NEXT_SNAPSHOT, CandidateHealth
from ext_proc.ranking import RANKERS
from ext_proc.routing_table import ModelRoute, PolicyRule

NOBODY_AT_CAP: frozenset[str] = frozenset()
"""No provider at its max_concurrency: what `full` is for nearly every request."""

DEFAULT_MAX_TOKENS = 256
"""Output tokens assumed when the request does not say (OpenAI's max_tokens is optional)."""

BYTES_PER_TOKEN = 4
"""Prompt estimate without a tokenizer: ~4 bytes of English text (or JSON) per token."""


EXCLUDED_PREFIX = "x:"
"""Marks an excluded candidate's reason in the candidate summary (a score otherwise)."""


NO_OUTPUT_PATHS = frozenset({"/v1/embeddings"})
"""Paths that answer no text: no output tokens are assumed when a request there says none."""


def estimate_prompt_tokens(body_bytes: int) -> int:
    """Prompt tokens from the request body's size (or its content-length)."""
    return body_bytes // BYTES_PER_TOKEN


def content_length(value: str | bytes) -> int:
    """A content-length header's bytes; 0 unless it is plain ASCII digits (a sign, spaces or
    underscores, which int() accepts, must not make a negative or odd estimate). Routing and
    the clients' token limits both read it here, so they cannot disagree."""
    return int(value) if value.isascii() and value.isdigit() else 0


def default_max_tokens(path: str) -> int:
    """Output tokens assumed when a request does not say: none on a path that answers no
    text (embeddings), else the router's default."""
    return 0 if path in NO_OUTPUT_PATHS else DEFAULT_MAX_TOKENS


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    provider: str
    cluster: str
    provider_model_id: str
    expected_cost_usd: float
    expected_latency_ms: float | None
    """Measured EWMA; None when unmeasured."""
    score: float | None
    """The strategy's rank key (lower is better); None when excluded."""
    excluded: str | None
    """Why the candidate cannot be used, or None."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    provider: str
    cluster: str
    provider_model_id: str
    model: str
    """Canonical public model name."""
    policy: str
    strategy: str
    reason: str
    fallbacks: tuple[str, ...]
    """Next providers in rank order (at most the policy's max_fallbacks)."""
    candidate_summary: str
    """Every candidate in rank order with its score or exclusion (see candidate_summary())."""
    audit: Callable[[], tuple[Candidate, ...]] = field(repr=False, compare=False)
    """Builds `candidates` on demand: only audits read them, so routing does not pay for them."""

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        """Every offering, in rank order, excluded ones last."""
        return self.audit()


class NoCandidateError(Exception):
    """No offering of the model can take the request; `reason` says why, per provider."""

    def __init__(self, model: str, reason: str, candidates: tuple[Candidate, ...] = ()) -> None:
        super().__init__(reason)
        self.model = model
        self.reason = reason
        self.candidates = candidates


def decide(
    route: ModelRoute,
    health: CandidateHealth,
    policy: PolicyRule,
    *,
    strategy: str,
    prompt_tokens: int,
    max_tokens: int,
    now_unix_ms: int,
    full: AbstractSet[str] = NOBODY_AT_CAP,
) -> Decision:
    """Rank the route's candidates for one request; NoCandidateError when none is eligible.
    `full`: providers the request's edge has at their max_concurrency (its requests to them
    would wait), tried after the others."""
    providers = route.providers
    if not providers:
        raise NoCandidateError(route.name, f"no provider offers {route.name}")
    # As floats once: an int operand would be converted again for every candidate (same result).
    prompt, output = float(prompt_tokens), float(max_tokens)
    cost = [(prompt * i + output * o) / 1e6 for i, o in route.prices]
    latency = health.latencies
    fits = route.fit_flags
    count = len(providers)
    if policy.providers:
        allowed: Sequence[bool] = [p in policy.providers for p in providers]
        usable: Sequence[bool] = [f and a for f, a in zip(fits, allowed)]
    else:
        allowed, usable = [True] * count, fits
    until = health.ejected_until
    panic = False
    skipped: Sequence[bool] = ()
    if health.any_ejected:
        ejected = [u == UNTIL_NEXT_SNAPSHOT or u > now_unix_ms for u in until]
        panic = not any(u and not e for u, e in zip(usable, ejected)) and any(usable)
        if panic:
            # Every provider that could serve is ejected. Like Envoy's panic threshold: rank them
            # all and let the request fail over through them, rather than answer a certain 503
            # while one of them may already have recovered (ejection trails the provider by a
            # cooldown).
            until = (NOT_EJECTED,) * count
            eligible: Sequence[bool] = usable
        else:
            skipped = [u and e for u, e in zip(usable, ejected)]
            eligible = [u and not e for u, e in zip(usable, ejected)]
    else:
        eligible = usable
    if not any(eligible):
        excluded = _excluded(route, policy, until, now_unix_ms, allowed)
        detail = "; ".join(f"{p}: {why}" for p, why in zip(providers, excluded, strict=True))
        raise NoCandidateError(
            route.name,
            f"no provider can serve {route.name} ({detail})",
            _candidates(route, cost, latency, None, excluded, range(len(excluded))),
        )
    every_eligible = all(eligible)
    keeps, score, describe = RANKERS[strategy](
        route, policy, cost, health, eligible, prompt_tokens + max_tokens
    )
    order = _rank(route, keeps, eligible, score)
    winner = order[0]
    reason = describe(winner) + (" (degraded)" if health.degraded_flags[winner] else "")
    if panic:
        reason += "; every fitting provider ejected: tried anyway"
    any_skipped = any(skipped)
    if any_skipped:
        reason += "; " + ", ".join(p for p, s in zip(providers, skipped) if s) + " ejected"
    walk = order[:] if every_eligible else [i for i in order if eligible[i]]
    if full and providers[winner] in full:
        walk, order, note = _spill(providers, walk, order, eligible, full, policy.max_fallbacks)
        reason += note
    # Ejected providers that could serve come last, after every eligible one: a fleet ejection
    # trails the provider by its cooldown, and trying one beats failing the client request.
    if len(walk) <= policy.max_fallbacks and any_skipped:
        walk += [i for i in order if skipped[i]]
    best = walk[0]
    summary = candidate_summary(
        route,
        order,
        score,
        None if every_eligible else eligible,
        functools.partial(_exclusion, route, policy, until, now_unix_ms, allowed),
    )
    return Decision(
        provider=providers[best],
        cluster=route.clusters[best],
        provider_model_id=route.provider_model_ids[best],
        model=route.name,
        policy=policy.name,
        strategy=strategy,
        reason=reason,
        fallbacks=tuple(providers[i] for i in walk[1 : 1 + policy.max_fallbacks]),
        candidate_summary=summary,
        audit=functools.partial(
            _audited, route, policy, cost, latency, score, until, now_unix_ms, allowed, order
        ),
    )


def _rank(
    route: ModelRoute, keeps: Sequence[bool], eligible: Sequence[bool], score: Sequence[float]
) -> list[int]:
    """Candidate indices best first: those that keep the strategy's constraint, then the other
    eligible ones, then the rest; by score within each, ties in provider order."""
    count = len(score)
    if route.ties_in_index_order and all(keeps):
        # Every candidate keeps the constraint (so is eligible): one stable sort on the score.
        return sorted(range(count), key=score.__getitem__)
    inf = math.inf
    ranked = sorted(zip(
        [0 if k else 1 if e else 2 for k, e in zip(keeps, eligible)],
        [s if e else inf for s, e in zip(score, eligible)],
        route.tie_break,
        range(count),
    ))
    return [entry[3] for entry in ranked]


def _spill(
    providers: tuple[str, ...], walk: list[int], order: list[int], eligible: Sequence[bool],
    full: AbstractSet[str], max_fallbacks: int,
) -> tuple[list[int], list[int], str]:
    """(walk, order, the reason's note) with the providers at their cap behind up to
    `max_fallbacks` others: at its cap a provider makes the edge queue the request
    (provider_cap.py), which the fleet's latency does not show. So they stay among the
    request's attempts when there is more than one (waiting for one beats a 503 when the others
    fail); with one attempt, the first not at its cap takes it. The others keep their rank, even
    one that breaks the strategy's constraint (over the SLA, say): any of them serves now. The
    order (the audit line's, whose first scored entry is the choice) is the walk's (the eligible
    ones), then the rest. When every provider of the walk is at its cap, nothing moves."""
    ready = [i for i in walk if providers[i] not in full]
    if not ready:
        return walk, order, ""
    capped = [i for i in walk if providers[i] in full]
    keep = max(max_fallbacks, 1)
    walk = ready[:keep] + capped + ready[keep:]
    rest = [i for i in order if not eligible[i]]
    names = ", ".join(providers[i] for i in capped)
    return walk, walk + rest, f"; {names} at max_concurrency: {providers[walk[0]]} first"


def _ejection(until_unix_ms: int, now_unix_ms: int) -> str:
    if until_unix_ms == UNTIL_NEXT_SNAPSHOT:
        return "ejected (until fleet health lifts it)"
    return f"ejected (cooling down for {(until_unix_ms - now_unix_ms) / 1000:.1f} s)"


def _exclusion(
    route: ModelRoute,
    policy: PolicyRule,
    until: Sequence[int],
    now_unix_ms: int,
    allowed: Sequence[bool],
    i: int,
) -> str | None:
    """Why candidate `i` cannot be used (None when it can); `until` is each candidate's
    ejected_until (all NOT_EJECTED in panic mode)."""
    unfit = route.unfit[i]
    if unfit is not None:
        return unfit
    if until[i] == UNTIL_NEXT_SNAPSHOT or until[i] > now_unix_ms:
        return _ejection(until[i], now_unix_ms)
    return None if allowed[i] else f"not in policy {policy.name}'s providers"


def _excluded(
    route: ModelRoute,
    policy: PolicyRule,
    until: Sequence[int],
    now_unix_ms: int,
    allowed: Sequence[bool],
) -> list[str | None]:
    """Why each candidate cannot be used (None when it can)."""
    return [
        _exclusion(route, policy, until, now_unix_ms, allowed, i)
        for i in range(len(route.providers))
    ]


def candidate_summary(
    route: ModelRoute,
    order: list[int],
    score: Sequence[float],
    eligible: Sequence[bool] | None,
    exclusion: Callable[[int], str | None],
) -> str:
    """The compact audit line of a decision, every candidate in rank order:
    "vast=7.048e-05;runpod=0.000126;lambda=x:gpu ... too small" (provider=score, or
    provider=x:why it was excluded; ";" in a reason becomes ","). The control plane's audit log
    parses it (control_plane/audit.py parse_candidates); Envoy's access log carries it.
    `eligible` None: every candidate is."""
    formats = route.summary_formats
    if eligible is None:
        # The route's entries joined into one format for every score at once: a third cheaper
        # than an f-string per candidate, and every request pays for this line.
        return ";".join([formats[i] for i in order]) % tuple([score[i] for i in order])
    providers = route.providers
    return ";".join(
        [
            formats[i] % score[i]
            if eligible[i]
            else f"{providers[i]}={EXCLUDED_PREFIX}{(exclusion(i) or '').replace(';', ',')}"
            for i in order
        ]
    )


def _audited(
    route: ModelRoute,
    policy: PolicyRule,
    cost: list[float],
    latency: Sequence[float],
    score: list[float],
    until: Sequence[int],
    now_unix_ms: int,
    allowed: Sequence[bool],
    order: list[int],
) -> tuple[Candidate, ...]:
    excluded = _excluded(route, policy, until, now_unix_ms, allowed)
    return _candidates(route, cost, latency, score, excluded, order)


def _candidates(
    route: ModelRoute,
    cost: list[float],
    latency: Sequence[float],
    score: list[float] | None,
    excluded: list[str | None],
    order: range | list[int],
) -> tuple[Candidate, ...]:
    return tuple(
        Candidate(
            provider=route.providers[i],
            cluster=route.clusters[i],
            provider_model_id=route.provider_model_ids[i],
            expected_cost_usd=cost[i],
            expected_latency_ms=None if math.isnan(latency[i]) else latency[i],
            score=None if score is None or excluded[i] is not None else score[i],
            excluded=excluded[i],
        )
        for i in order
    )
