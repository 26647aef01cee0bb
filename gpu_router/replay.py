"""`gpu-router replay`: re-decide recorded requests under another policy; no traffic is sent.

Each ledger row is decided again with ext_proc's own `decide()` over the other policy's routing
table (built exactly as ext_proc builds it from the RoutingPolicy the control plane would
send), with the health that was current at the request's start: the health history is
streamed in time order alongside the requests and aligned as ext_proc aligns the
HealthSnapshot it would have held (replay_health.py). A decision's inputs are the ones ext_proc
had: the request's model, its path, its body size (the prompt estimate) and max_tokens. Rows
and history are read with cursors and only sums per (model, served by, picked) are kept, so
memory stays bounded whatever the window; decide() runs once per distinct thing its choice
reads (replay_health.health_key, the ranking key, ejections), and each group's tokens are
priced once.

What replay cannot know: latency under the other policy is the recorded EWMA of the provider it
would have picked (a provider given more traffic may have been slower), tokens are the ones
the request used (the same model on another provider may answer at another length), request
headers are not recorded (a request keeps the policy of its recorded name when the other file
has one, else the first policy matching its path and model), and a strategy a client forced
by header is not known apart from its policy's. Health is as recorded every 10 s and at each
state change, so a decision taken between two rows may have seen a slightly different EWMA.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control_plane.ledger.report import ReportError, read_only
from control_plane.ledger.savings import offerings, price_tokens
from control_plane.policy.model import Price, RoutingConfig
from control_plane.policy.wire import to_routing_policy
from ext_proc.health_view import UNTIL_NEXT_SNAPSHOT
from ext_proc.routing_table import ModelRoute, PolicyRule, build_routing_table
from ext_proc.scoring import (
    DEFAULT_MAX_TOKENS,
    DEGRADED_PENALTY,
    NoCandidateError,
    decide,
    estimate_prompt_tokens,
)
from gpu_router.replay_health import FETCH, Aligned, HealthTimeline, health_key

NO_OUTPUT_PATHS = ("/v1/embeddings",)
"""Paths ext_proc assumes no output for when max_tokens is absent."""
_ROWS = ("SELECT at_unix_ms, model, provider, policy, candidates, path, request_bytes, max_tokens, "
         "input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens, "
         "cost_usd FROM requests WHERE at_unix_ms >= ? AND at_unix_ms < ? ORDER BY at_unix_ms")


@dataclass(slots=True)
class Side:
    """What happened, or what the other policy would have done, summed."""

    cost_usd: float = 0.0
    shares: dict[str, int] = field(default_factory=dict)
    latency_sum_ms: float = 0.0
    latency_n: int = 0
    """Requests whose provider's EWMA was recorded (the rest were unmeasured)."""

    def add_group(self, provider: str, requests: int, cost: float, latency_sum_ms: float,
                  latency_n: int) -> None:
        """`requests` requests at once, with their summed cost and EWMAs."""
        self.cost_usd += cost
        self.shares[provider] = self.shares.get(provider, 0) + requests
        self.latency_sum_ms += latency_sum_ms
        self.latency_n += latency_n

    def to_json(self) -> dict[str, Any]:
        total = sum(self.shares.values())
        return {"cost_usd": self.cost_usd,
                "shares": {p: n / total for p, n in sorted(self.shares.items())},
                "requests": dict(sorted(self.shares.items())),
                "expected_latency_ms": self.latency_sum_ms / self.latency_n
                if self.latency_n else None}


@dataclass(slots=True)
class Replay:
    requests: int = 0
    """Routed requests re-decided."""
    changed: int = 0
    recorded: Side = field(default_factory=Side)
    replayed: Side = field(default_factory=Side)
    could_not_serve: dict[str, int] = field(default_factory=dict)
    """Why -> requests the other policy would have refused (not in either side's sums)."""
    to_ejected: int = 0
    """Replayed decisions whose provider was ejected then (every fitting one was)."""
    unrouted: int = 0
    """Rows that never reached a provider (not replayed)."""
    decide_calls: int = 0

    def refused(self, why: str) -> None:
        self.could_not_serve[why] = self.could_not_serve.get(why, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "changed": self.changed,
                "recorded": self.recorded.to_json(), "replayed": self.replayed.to_json(),
                "could_not_serve": self.could_not_serve, "to_ejected_provider": self.to_ejected,
                "not_routed": self.unrouted}


def ranking_key(route: ModelRoute, health: Aligned, rule: PolicyRule, strategy: str,
                prompt_tokens: int, max_tokens: int) -> tuple[Any, ...]:
    """What decide()'s choice depends on besides the route, the policy and the health: for
    cost and latency, the order of cost x degraded penalty (ties in provider order, as decide
    breaks them) and which candidates are under the cost ceiling, computed as decide computes
    them; for balanced, whose score weighs the costs themselves, the tokens. Requests with equal
    keys under the same health get the same decision, so each key is decided once."""
    if strategy == "balanced":
        return (prompt_tokens, max_tokens)
    if not uses_tokens(rule, strategy):
        return ()
    cost = [(prompt_tokens * i + max_tokens * o) / 1e6 for i, o in route.prices]
    by_cost = [c * DEGRADED_PENALTY if d else c for c, d in zip(cost, health.degraded_flags)]
    order = tuple(sorted(range(len(cost)), key=by_cost.__getitem__))  # stable: provider order
    ceiling = rule.cost_ceiling_usd_per_mtok
    tokens = prompt_tokens + max_tokens
    if ceiling <= 0:
        return (order,)
    price = [c * 1e6 / tokens for c in cost] if tokens else [i for i, _ in route.prices]
    return (order, tuple(p <= ceiling for p in price))


def uses_tokens(rule: PolicyRule, strategy: str) -> bool:
    """Whether decide()'s choice can depend on the tokens: not for latency without a cost
    ceiling, which ranks every eligible candidate (there is one, else it raises) by latency."""
    return strategy != "latency" or rule.cost_ceiling_usd_per_mtok > 0


def token_class(route: ModelRoute, rule: PolicyRule, prompt_tokens: int,
                max_tokens: int) -> tuple[bool, ...] | None:
    """For latency under a cost ceiling, while no ejection holds: which candidates are under the
    ceiling, when one that may serve is (then latency alone ranks them, as decide() does, so
    requests with equal flags get equal decisions); None when the tokens matter further."""
    if rule.strategy != "latency":
        return None
    cost = [(prompt_tokens * i + max_tokens * o) / 1e6 for i, o in route.prices]
    tokens = prompt_tokens + max_tokens
    price = [c * 1e6 / tokens for c in cost] if tokens else [i for i, _ in route.prices]
    under = tuple(p <= rule.cost_ceiling_usd_per_mtok for p in price)
    usable = [fits and (not rule.providers or provider in rule.providers)
              for fits, provider in zip(route.fit_flags, route.providers, strict=True)]
    return under if any(u and ok for u, ok in zip(under, usable, strict=True)) else None


def _recorded_choice(candidates: str, provider: str) -> str:
    """ext_proc's first scored candidate; the serving provider when nothing was recorded."""
    for entry in candidates.split(";"):
        name, _, value = entry.partition("=")
        if value and not value.startswith("x:"):
            return name
    return provider


def ejected_at(health: Aligned, at: int) -> tuple[bool, ...]:
    """Which candidates an ejection holds at `at` (as decide() tells them)."""
    if not health.any_ejected:
        return (False,) * len(health.ejected_until)
    return tuple(u == UNTIL_NEXT_SNAPSHOT or u > at for u in health.ejected_until)


class Decider:
    """decide() once per (model, policy, ejections, health_key, ranking key): what its choice
    reads, so the history rows that only nudge an EWMA decide nothing anew; at most MEMO
    entries are kept (then it starts over), so memory stays bounded."""

    MEMO = 20_000

    def __init__(self) -> None:
        self._memo: dict[tuple[Any, ...], int | None] = {}
        self.calls = 0

    def choice(self, route: ModelRoute, health: Aligned, rule: PolicyRule, prompt_tokens: int,
               max_tokens: int, ejected: tuple[bool, ...], at: int) -> int | None:
        """Index of the provider decide() picks; None when no provider can serve."""
        key = (route.name, rule.name, ejected, health_key(health, rule),
               ranking_key(route, health, rule, rule.strategy, prompt_tokens, max_tokens))
        if key in self._memo:
            return self._memo[key]
        self.calls += 1
        try:
            decision = decide(route, health.candidate_health(), rule, strategy=rule.strategy,
                              prompt_tokens=prompt_tokens, max_tokens=max_tokens, now_unix_ms=at)
            picked: int | None = route.providers.index(decision.provider)
        except NoCandidateError:
            picked = None
        if len(self._memo) >= self.MEMO:
            self._memo.clear()
        self._memo[key] = picked
        return picked


Outcome = tuple[int, str, bool, bool, float, float] | str
"""(picked index, picked provider, changed, sent to an ejected one, recorded EWMA, replayed
EWMA), or why no provider could serve."""


class _Replayer:
    """Folds rows into sums per (model, served by, picked): each row costs a few dict lookups;
    an outcome is worked out once per (model, policy, health version, ejections, recorded choice,
    ranking key) and each group's token sums are priced once, at the end."""

    def __init__(self, config: RoutingConfig) -> None:
        self.table = build_routing_table(to_routing_policy(config))
        self._prices: dict[str, dict[str, Price]] = offerings(config)
        self._policies = {rule.name: rule for rule in self.table.policies}
        self._routes: dict[str, ModelRoute | None] = {}
        self._rules: dict[tuple[str, str, str], tuple[PolicyRule, bool]] = {}
        self._outcomes: dict[tuple[Any, ...], Outcome] = {}
        self._rankings: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self.decider = Decider()
        self.sums: dict[tuple[str, str, str], list[float]] = {}
        """(model, served by, picked) -> requests, cost, tokens by KINDS, changed, to ejected,
        recorded EWMA sum and count, replayed EWMA sum and count."""
        self.result = Replay()

    def route(self, model: str) -> ModelRoute | None:
        if model not in self._routes:
            self._routes[model] = self.table.resolve(model)
        return self._routes[model]

    def rule(self, policy: str, path: str, model: str) -> tuple[PolicyRule, bool]:
        """The rule a row is decided under, and whether its tokens matter to the decision."""
        found = self._rules.get((policy, path, model))
        if found is None:
            rule = self._policies.get(policy) or self.table.match(path, {}, model)
            found = self._rules[policy, path, model] = (rule, uses_tokens(rule, rule.strategy))
        return found

    def outcome(self, route: ModelRoute, health: Aligned, version: int, rule: PolicyRule,
                tokens: tuple[int, int] | None, recorded: str, at: int) -> Outcome:
        ejected = ejected_at(health, at)
        key = (route.name, rule.name, version, ejected, recorded,
               () if tokens is None else self._ranking(route, health, rule, tokens))
        found = self._outcomes.get(key)
        if found is not None:
            return found
        prompt, wanted = tokens or (0, 0)
        index = self.decider.choice(route, health, rule, prompt, wanted, ejected, at)
        if index is None:
            found = "no provider could serve"
        else:
            at_recorded = (route.providers.index(recorded) if recorded in route.providers
                           else None)
            found = (index, route.providers[index], recorded != route.providers[index],
                     ejected[index], math.nan if at_recorded is None
                     else health.latencies[at_recorded], health.latencies[index])
        if len(self._outcomes) >= Decider.MEMO:
            self._outcomes.clear()
        self._outcomes[key] = found
        return found

    def _ranking(self, route: ModelRoute, health: Aligned, rule: PolicyRule,
                 tokens: tuple[int, int]) -> tuple[Any, ...]:
        """ranking_key, remembered per (tokens, degraded flags): few distinct ones recur."""
        key = (route.name, rule.name, tokens, health.degraded_flags)
        found = self._rankings.get(key)
        if found is None:
            if len(self._rankings) >= Decider.MEMO:
                self._rankings.clear()
            found = self._rankings[key] = ranking_key(route, health, rule, rule.strategy, *tokens)
        return found

    def folded(self, model: str, provider: str,
               outcome: tuple[int, str, bool, bool, float, float]) -> Folded:
        """Where a row with this outcome adds up, and what it adds besides its cost and tokens."""
        _, picked, changed, to_ejected, recorded_ms, replayed_ms = outcome
        sums = self.sums.get((model, provider, picked))
        if sums is None:
            sums = self.sums[model, provider, picked] = [0.0] * 13
        recorded_n, replayed_n = int(not math.isnan(recorded_ms)), int(not math.isnan(replayed_ms))
        return (sums, int(changed), int(to_ejected), recorded_ms if recorded_n else 0.0,
                recorded_n, replayed_ms if replayed_n else 0.0, replayed_n)

    def finish(self) -> Replay:
        result = self.result
        for (model, provider, picked), sums in sorted(self.sums.items()):
            requests = int(sums[0])
            result.changed += int(sums[7])
            result.to_ejected += int(sums[8])
            result.recorded.add_group(provider, requests, sums[1], sums[9], int(sums[10]))
            result.replayed.add_group(
                picked, requests, price_tokens(tuple(sums[2:7]), self._prices[model][picked]),
                sums[11], int(sums[12]))
        result.decide_calls = self.decider.calls
        return result


Folded = tuple[list[float], int, int, float, int, float, int]
"""A group's sums (_Replayer.sums), and a row's changed, to ejected, recorded EWMA and whether
measured, replayed EWMA and whether measured (unmeasured EWMAs are left out)."""


def _fold(folded: Folded, cost: float, tokens: list[int]) -> None:
    sums, changed, to_ejected, recorded_ms, recorded_n, replayed_ms, replayed_n = folded
    sums[0] += 1
    sums[1] += cost
    sums[2] += tokens[0]
    sums[3] += tokens[1]
    sums[4] += tokens[2]
    sums[5] += tokens[3]
    sums[6] += tokens[4]
    sums[7] += changed
    sums[8] += to_ejected
    sums[9] += recorded_ms
    sums[10] += recorded_n
    sums[11] += replayed_ms
    sums[12] += replayed_n


def replay(db_path: str | Path, config: RoutingConfig, since_ms: int, until_ms: int) -> Replay:
    """Re-decide every request with since <= at < until under `config`.

    A row whose (model, served by, policy, path, recorded choice, health version, tokens when
    they matter) was seen while no ejection held its model's candidates adds up where that one
    did, without deciding anything."""
    replayer = _Replayer(config)
    result = replayer.result
    seen: dict[tuple[Any, ...], Folded | str] = {}
    with read_only(Path(db_path)) as connection:
        try:
            timeline = HealthTimeline(connection, replayer.table, since_ms, until_ms)
            cursor = connection.execute(_ROWS, (since_ms, until_ms))
            while chunk := cursor.fetchmany(FETCH):
                for (at, model, provider, policy, candidates, path, body_bytes, max_tokens,
                     *tokens, cost) in chunk:
                    if not provider:
                        result.unrouted += 1
                        continue
                    result.requests += 1
                    route = replayer.route(model)
                    if route is None:
                        result.refused("model not in the policy")
                        continue
                    if at >= timeline.next_at:
                        timeline.advance(at)
                    rule, by_tokens = replayer.rule(policy, path, route.name)
                    recorded = _recorded_choice(candidates, provider)
                    asked = None
                    if by_tokens:
                        asked = (estimate_prompt_tokens(body_bytes), max_tokens if max_tokens >= 0
                                 else 0 if path in NO_OUTPUT_PATHS else DEFAULT_MAX_TOKENS)
                    key = (route.name, provider, rule.name, recorded, timeline.version(route.name),
                           asked and (token_class(route, rule, *asked) or asked))
                    folded = seen.get(key)
                    if folded is None:
                        health = timeline.aligned(route.name)
                        outcome = replayer.outcome(route, health, timeline.version(route.name),
                                                   rule, asked, recorded, at)
                        folded = outcome if isinstance(outcome, str) else replayer.folded(
                            route.name, provider, outcome)
                        if not health.any_ejected:  # else the outcome depends on the time
                            if len(seen) >= Decider.MEMO:
                                seen.clear()
                            seen[key] = folded
                    if isinstance(folded, str):
                        result.refused(folded)
                    else:
                        _fold(folded, cost, tokens)
        except sqlite3.Error as error:
            raise ReportError(f"cannot read the usage ledger {db_path}: {error}") from error
    return replayer.finish()


def render_replay(result: Replay, policy_source: str, since: str, until: str) -> str:
    recorded, replayed = result.recorded.to_json(), result.replayed.to_json()

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    providers = sorted(set(recorded["requests"]) | set(replayed["requests"]))
    rows = [("cost USD", f"{recorded['cost_usd']:.6f}", f"{replayed['cost_usd']:.6f}"),
            ("expected latency ms (EWMA)", ms(recorded["expected_latency_ms"]),
             ms(replayed["expected_latency_ms"]))]
    rows += [(f"share {p}", f"{recorded['shares'].get(p, 0):.1%}",
              f"{replayed['shares'].get(p, 0):.1%}") for p in providers]
    width = max(len(r[0]) for r in rows)
    lines = [f"gpu-router replay of {policy_source} over {since} .. {until} UTC (no traffic sent)",
             "", f"{'':<{width}}  {'recorded':>12}  {'replayed':>12}"]
    lines += [f"{name:<{width}}  {a:>12}  {b:>12}" for name, a, b in rows]
    refused = sum(result.could_not_serve.values())
    lines += ["", f"requests replayed: {result.requests}; decisions changed: {result.changed}",
              f"could not serve under this policy: {refused}" + (
                  f" ({', '.join(f'{n} {why}' for why, n in result.could_not_serve.items())})"
                  if refused else "") + "; costs above leave them out on both sides",
              f"sent to an ejected provider (every fitting one was): {result.to_ejected}",
              f"not routed (never reached a provider, not replayed): {result.unrouted}",
              "", "latency = the recorded EWMA of the provider picked, at the request's time"]
    return "\n".join(lines)
