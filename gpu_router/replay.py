"""`gpu-router replay`: re-decide recorded requests under another policy; no traffic is sent.

Each ledger row is decided again with ext_proc's own `decide()` over the other policy's routing
table (built exactly as ext_proc builds it from the RoutingPolicy the control plane would
send), with the health that was current at the request's start, aligned as ext_proc aligns the
HealthSnapshot it would have held (replay_health.py). A decision's inputs are the ones ext_proc
had: the request's model, its path, its body size (the prompt estimate) and max_tokens. No
request row goes through Python: SQLite sums the rows per group of requests whose decision
reads the same things (replay_groups.py: model, rule, health interval, token class), decide()
runs once per distinct group, and each (model, served by, picked)'s tokens are priced once.
Memory holds the health periods of at most SLICE_MS of the window at a time as numpy arrays
(the window is replayed a slice after another, so memory stays bounded whatever its length) and
the sums; the groups live in a SQLite temp table.

What replay cannot know: latency under the other policy is the recorded EWMA of the provider it
would have picked (a provider given more traffic may have been slower), tokens are the ones
the request used (the same model on another provider may answer at another length), request
headers are not recorded (a request keeps the policy of its recorded name when the other file
has one, else the first policy matching its path and model), and a strategy a client forced
by header is not known apart from its policy's. Health is as recorded every 10 s and at each
state change, so a decision taken between two rows may have seen a slightly different EWMA.
Nor which providers an edge had at their max_concurrency (not recorded): a request that went to
the next provider because the first was at its cap replays as the first's.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control_plane.ledger.report import ReportError, read_only
from control_plane.ledger.savings import offerings, price_tokens
from control_plane.policy.model import Price, RoutingConfig
from control_plane.policy.wire import to_routing_policy
from ext_proc.health_view import DEGRADED_PENALTY
from ext_proc.routing_table import ModelRoute, PolicyRule, build_routing_table
from ext_proc.scoring import NoCandidateError, decide
from gpu_router.replay_groups import Group, GroupQuery
from gpu_router.replay_health import Aligned, Periods, health_key, read_periods


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

    def refused(self, why: str, requests: int = 1) -> None:
        self.could_not_serve[why] = self.could_not_serve.get(why, 0) + requests

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "changed": self.changed,
                "recorded": self.recorded.to_json(), "replayed": self.replayed.to_json(),
                "could_not_serve": self.could_not_serve, "to_ejected_provider": self.to_ejected,
                "not_routed": self.unrouted}


def ranking_key(route: ModelRoute, health: Aligned, rule: PolicyRule, prompt_tokens: int,
                max_tokens: int) -> tuple[Any, ...]:
    """What decide()'s choice depends on besides the route, the policy and the health: for
    cost and latency, the order of cost x degraded penalty (ties in provider order, as decide
    breaks them) and which candidates are under the cost ceiling, computed as decide computes
    them; for balanced, whose score weighs the costs themselves, the tokens. Requests with equal
    keys under the same health get the same decision, so each key is decided once."""
    if rule.strategy == "balanced":
        return (prompt_tokens, max_tokens)
    if rule.strategy == "latency" and rule.cost_ceiling_usd_per_mtok <= 0:
        return ()  # every eligible candidate ranks by latency alone
    cost = [(prompt_tokens * i + max_tokens * o) / 1e6 for i, o in route.prices]
    by_cost = [c * DEGRADED_PENALTY if d else c for c, d in zip(cost, health.degraded_flags)]
    order = tuple(sorted(range(len(cost)), key=by_cost.__getitem__))  # stable: provider order
    ceiling = rule.cost_ceiling_usd_per_mtok
    tokens = prompt_tokens + max_tokens
    if ceiling <= 0:
        return (order,)
    price = [c * 1e6 / tokens for c in cost] if tokens else [i for i, _ in route.prices]
    return (order, tuple(p <= ceiling for p in price))


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
               ranking_key(route, health, rule, prompt_tokens, max_tokens))
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


SLICE_MS = 7 * 86_400_000
"""Replay holds the health periods of this much of the window at a time (a week of 10 s
periods for the default policy's models: ~15 MB); a group split at a slice's edge decides as
its other half and their sums add up alike."""


class _Replayer:
    """Adds up groups (replay_groups.Group) per (model, served by, picked); decides once per
    distinct group.decides, and each (model, served by, picked)'s tokens are priced once, at the
    end."""

    def __init__(self, config: RoutingConfig) -> None:
        self.table = build_routing_table(to_routing_policy(config))
        self._prices: dict[str, dict[str, Price]] = offerings(config)
        self.decider = Decider()
        self._picks: dict[tuple[Any, ...], tuple[int, bool] | None] = {}
        self.sums: dict[tuple[str, str, str], list[float]] = {}
        """(model, served by, picked) -> requests, cost, tokens by KINDS, changed, to ejected,
        recorded EWMA sum and count, replayed EWMA sum and count."""
        self.result = Replay()

    def next_slice(self) -> None:
        """Forget the picks remembered by group: a slice numbers its periods anew."""
        self._picks.clear()

    def _pick(self, group: Group, periods: Periods) -> tuple[int, bool] | None:
        """The candidate decide() picks for the group, and whether an ejection held it."""
        if group.decides in self._picks:
            return self._picks[group.decides]
        route = self.table.models[group.model]  # type: ignore[index]
        health, at = periods.aligned(group.period), int(periods.starts[group.period])
        ejected = tuple(periods.ejected[group.period].tolist())
        index = self.decider.choice(route, health, group.rule, group.prompt, group.wanted,
                                    ejected, at)
        if len(self._picks) >= Decider.MEMO:
            self._picks.clear()
        found = self._picks[group.decides] = None if index is None else (index, ejected[index])
        return found

    def add(self, group: Group, periods: dict[str, Periods]) -> None:
        result = self.result
        if not group.served:
            result.unrouted += group.requests
            return
        result.requests += group.requests
        if group.model is None:
            result.refused("model not in the policy", group.requests)
            return
        picked = self._pick(group, periods[group.model])
        if picked is None:
            result.refused("no provider could serve", group.requests)
            return
        index, to_ejected = picked
        providers = self.table.models[group.model].providers
        choice = providers[index]
        sums = self.sums.get((group.model, group.served, choice))
        if sums is None:
            sums = self.sums[group.model, group.served, choice] = [0.0] * 13
        sums[0] += group.requests
        sums[1] += group.cost
        for kind, tokens in enumerate(group.tokens, start=2):
            sums[kind] += tokens
        sums[7] += group.requests if group.recorded != choice else 0
        sums[8] += group.requests if to_ejected else 0
        if group.recorded in providers:
            recorded = providers.index(group.recorded)
            sums[9] += group.latency_sums[recorded]
            sums[10] += group.latency_counts[recorded]
        sums[11] += group.latency_sums[index]
        sums[12] += group.latency_counts[index]

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


def replay(db_path: str | Path, config: RoutingConfig, since_ms: int, until_ms: int) -> Replay:
    """Re-decide every request with since <= at < until under `config`, a SLICE_MS of the window
    after another: SQLite sums the requests per group (replay_groups), Python decides once per
    group."""
    replayer = _Replayer(config)
    try:
        for start in range(since_ms, until_ms, SLICE_MS):
            end = min(start + SLICE_MS, until_ms)
            with read_only(Path(db_path)) as connection:
                periods = read_periods(connection, replayer.table, start, end)
            replayer.next_slice()
            for group in GroupQuery(replayer.table, periods, end).groups(Path(db_path)):
                replayer.add(group, periods)
            del periods  # before the next slice's are read
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
