"""The row-by-row replay `gpu_router.replay` replaced (one decide() per distinct ranking key,
every row priced on its own), kept as the reference the grouped one must agree with.

`gpu-router replay`: re-decide recorded requests under another policy; no traffic is sent.

Each ledger row is decided again with ext_proc's own `decide()` over the other policy's routing
table (built exactly as ext_proc builds it from the RoutingPolicy the control plane would
send), with the health that was current at the request's start: the health history is
streamed in time order alongside the requests and rebuilt into the HealthSnapshot ext_proc
would have held. A decision's inputs are the ones ext_proc had: the request's model, its path,
its body size (the prompt estimate) and max_tokens. Rows and history are read with cursors and
only aggregates are kept, so memory stays bounded whatever the window; identical inputs under
the same health are decided once.

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from control_plane.audit import chosen, parse_candidates
from control_plane.ledger.health_history import HealthRow, rows_at, snapshot_of, stream_rows
from control_plane.ledger.report import ReportError, read_only
from control_plane.ledger.savings import offerings, price_tokens
from control_plane.policy.model import Price, RoutingConfig
from control_plane.policy.wire import to_routing_policy
from ext_proc.health_view import (
    DEGRADED_PENALTY,
    UNTIL_NEXT_SNAPSHOT,
    CandidateHealth,
    build_health_view,
)
from ext_proc.routing_table import ModelRoute, PolicyRule, RoutingTable, build_routing_table
from ext_proc.scoring import (
    NoCandidateError,
    decide,
    default_max_tokens,
    estimate_prompt_tokens,
)
from gpu_router.replay import Replay, Side
from gpu_router.replay_health import Aligned


def ejected_at(health: Aligned, at: int) -> tuple[bool, ...]:
    """Which candidates an ejection holds at `at` (as decide() tells them): the scalar rule
    the replay's Periods.ejected must agree with."""
    if not health.any_ejected:
        return (False,) * len(health.ejected_until)
    return tuple(u == UNTIL_NEXT_SNAPSHOT or u > at for u in health.ejected_until)


FETCH = 5000
_ROWS = ("SELECT at_unix_ms, model, provider, policy, candidates, path, request_bytes, max_tokens, "
         "input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens, "
         "cost_usd FROM requests WHERE at_unix_ms >= ? AND at_unix_ms < ? ORDER BY at_unix_ms")


def _add_one(side: Side, provider: str, cost: float, latency_ms: float) -> None:
    """One request on its own (NaN latency: its provider's EWMA was not recorded)."""
    measured = not math.isnan(latency_ms)
    side.add_group(provider, 1, cost, latency_ms if measured else 0.0, int(measured))


class HealthTimeline:
    """The fleet health current at any time, moving forward only, from the history table.

    A model's aligned health is rebuilt only when a row of one of its candidates (the model's
    own on a provider, or the provider-wide one) has arrived since: `version(model)` says so."""

    def __init__(self, connection: sqlite3.Connection, table: RoutingTable, since_ms: int,
                 until_ms: int) -> None:
        self._table = table
        self._current = {(r.provider, r.model): r for r in rows_at(connection, since_ms)}
        self._stream = stream_rows(connection, since_ms, until_ms)
        self._next: HealthRow | None = next(self._stream, None)
        self._models_of = {provider: [name for name, route in table.models.items()
                                      if provider in route.providers]
                           for provider in table.providers}
        self._versions = dict.fromkeys(table.models, 0)
        self._aligned: dict[str, CandidateHealth] = {}

    def advance(self, at_ms: int) -> None:
        while self._next is not None and self._next.at_unix_ms <= at_ms:
            row = self._next
            self._current[row.provider, row.model] = row
            for model in (self._models_of.get(row.provider, ()) if not row.model else
                          (row.model,) if row.model in self._versions else ()):
                self._versions[model] += 1
                self._aligned.pop(model, None)
            self._next = next(self._stream, None)

    def version(self, model: str) -> int:
        return self._versions[model]

    def aligned(self, model: str, at_ms: int) -> CandidateHealth:
        found = self._aligned.get(model)
        if found is None:
            route = self._table.models[model]
            rows = [self._current[key] for provider in route.providers
                    for key in ((provider, model), (provider, "")) if key in self._current]
            found = self._aligned[model] = build_health_view(snapshot_of(rows, at_ms)).align(route)
        return found


def ranking_key(route: ModelRoute, health: CandidateHealth, rule: PolicyRule, strategy: str,
                prompt_tokens: int, max_tokens: int) -> tuple[Any, ...]:
    """What decide()'s choice depends on besides the route, the policy and the health: for
    cost and latency, the order of cost x degraded penalty (ties in provider order, as decide
    breaks them) and which candidates are under the cost ceiling, computed as decide computes
    them; for balanced, whose score weighs the costs themselves, the tokens. Requests with equal
    keys under the same health get the same decision, so each key is decided once."""
    if strategy == "balanced":
        return (prompt_tokens, max_tokens)
    cost = [(prompt_tokens * i + max_tokens * o) / 1e6 for i, o in route.prices]
    by_cost = [c * DEGRADED_PENALTY if d else c for c, d in zip(cost, health.degraded_flags)]
    order = tuple(sorted(range(len(cost)), key=by_cost.__getitem__))  # stable: provider order
    ceiling = rule.cost_ceiling_usd_per_mtok
    tokens = prompt_tokens + max_tokens
    if ceiling <= 0:
        return (order,)
    price = [c * 1e6 / tokens for c in cost] if tokens else [i for i, _ in route.prices]
    return (order, tuple(p <= ceiling for p in price))


def _rows(connection: sqlite3.Connection, since_ms: int, until_ms: int) -> Iterator[tuple]:
    cursor = connection.execute(_ROWS, (since_ms, until_ms))
    while chunk := cursor.fetchmany(FETCH):
        yield from chunk


class Decider:
    """decide() once per (model, policy, strategy, health version, ejections, ranking key);
    at most MEMO entries are kept (then it starts over), so memory stays bounded."""

    MEMO = 20_000

    def __init__(self) -> None:
        self._memo: dict[tuple[Any, ...], int | None] = {}
        self.calls = 0

    def choice(self, route: ModelRoute, health: CandidateHealth, version: int, rule: PolicyRule,
               prompt_tokens: int, max_tokens: int, ejected: tuple[bool, ...],
               at: int) -> int | None:
        """Index of the provider decide() picks; None when no provider can serve."""
        key = (route.name, rule.name, version, ejected,
               ranking_key(route, health, rule, rule.strategy, prompt_tokens, max_tokens))
        if key in self._memo:
            return self._memo[key]
        self.calls += 1
        try:
            decision = decide(route, health, rule, strategy=rule.strategy,
                              prompt_tokens=prompt_tokens, max_tokens=max_tokens, now_unix_ms=at)
            picked: int | None = route.providers.index(decision.provider)
        except NoCandidateError:
            picked = None
        if len(self._memo) >= self.MEMO:
            self._memo.clear()
        self._memo[key] = picked
        return picked


def replay(db_path: str | Path, config: RoutingConfig, since_ms: int, until_ms: int) -> Replay:
    """Re-decide every request with since <= at < until under `config`."""
    table = build_routing_table(to_routing_policy(config))
    prices: dict[str, dict[str, Price]] = offerings(config)
    policies = {rule.name: rule for rule in table.policies}
    result = Replay()
    decider = Decider()
    with read_only(Path(db_path)) as connection:
        try:
            timeline = HealthTimeline(connection, table, since_ms, until_ms)
            for row in _rows(connection, since_ms, until_ms):
                (at, model, provider, policy, candidates, path, body_bytes, max_tokens,
                 *tokens, cost) = row
                if not provider:
                    result.unrouted += 1
                    continue
                result.requests += 1
                route = table.resolve(model)
                if route is None:
                    result.refused("model not in the policy")
                    continue
                timeline.advance(at)
                health = timeline.aligned(route.name, at)
                rule = policies.get(policy) or table.match(path, {}, route.name)
                wanted = max_tokens if max_tokens >= 0 else default_max_tokens(path)
                ejected = tuple(health.ejected(at).tolist())  # ext_proc's own test
                index = decider.choice(route, health, timeline.version(route.name), rule,
                                       estimate_prompt_tokens(body_bytes), wanted, ejected, at)
                if index is None:
                    result.refused("no provider could serve")
                    continue
                choice = route.providers[index]
                recorded = chosen(parse_candidates(candidates)) or provider
                result.changed += recorded != choice
                result.to_ejected += bool(ejected[index])
                recorded_at = (route.providers.index(recorded)
                               if recorded in route.providers else None)
                _add_one(result.recorded, provider, cost, math.nan if recorded_at is None
                         else health.latencies[recorded_at])
                _add_one(result.replayed, choice,
                         price_tokens(tuple(tokens), prices[route.name][choice]),
                         health.latencies[index])
        except sqlite3.Error as error:
            raise ReportError(f"cannot read the usage ledger {db_path}: {error}") from error
    result.decide_calls = decider.calls
    return result
