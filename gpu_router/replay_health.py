"""The fleet health that was current at each recorded request, for `gpu-router replay`.

Replay walks the requests in time order; HealthTimeline walks the health history alongside and
aligns a model's candidates (Aligned: the fields decide() reads) only when one of their rows
arrived. `health_key` is what decide()'s choice reads of an alignment, so decisions can be
remembered across the many history rows that only nudge an EWMA.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass

import numpy as np

from control_plane.ledger.health_history import rows_at
from ext_proc.health_view import NOT_EJECTED, UNTIL_NEXT_SNAPSHOT, CandidateHealth
from ext_proc.routing_table import ModelRoute, PolicyRule, RoutingTable
from ext_proc.scoring import DEGRADED_PENALTY

_HISTORY = ("SELECT at_unix_ms, provider, model, ewma_ms, state, ejected_until FROM health_history "
            "WHERE at_unix_ms > ? AND at_unix_ms <= ? ORDER BY at_unix_ms")
FETCH = 5000
Entry = tuple[float | None, str, int]
"""A health history row's (ewma_ms, state, ejected_until)."""


@dataclass(frozen=True, slots=True)
class Aligned:
    """One model's candidates' health as decide() reads it (CandidateHealth's plain fields)."""

    latencies: tuple[float, ...]
    """EWMA total latency; NaN when unmeasured."""
    degraded_flags: tuple[bool, ...]
    ejected_until: tuple[int, ...]
    any_ejected: bool
    any_degraded: bool

    @classmethod
    def of(cls, health: CandidateHealth) -> Aligned:
        return cls(health.latencies, health.degraded_flags, health.ejected_until,
                   health.any_ejected, health.any_degraded)

    def candidate_health(self) -> CandidateHealth:
        """The CandidateHealth decide() takes."""
        return CandidateHealth(latency_ms=np.array(self.latencies, dtype=np.float64),
                               degraded=np.array(self.degraded_flags, dtype=np.bool_),
                               ejected_until_unix_ms=np.array(self.ejected_until, dtype=np.int64))


def aligned_health(route: ModelRoute, current: dict[tuple[str, str], Entry]) -> Aligned:
    """What build_health_view(snapshot_of(rows)).align(route) gives, from the rows' entries: the
    model's measured EWMA else the provider-wide one; degraded or ejected when either entry is
    (an ejection without a cooldown lasts until the next snapshot, else the later cooldown)."""
    latency, degraded, ejected = [], [], []
    for provider in route.providers:
        entries = [entry for entry in (current.get((provider, route.name)),
                                       current.get((provider, ""))) if entry is not None]
        latency.append(next((e[0] for e in entries if e[0] is not None), math.nan))
        degraded.append(any(e[1] == "degraded" for e in entries))
        cooldowns = [e[2] for e in entries if e[1] == "ejected"]
        ejected.append(NOT_EJECTED if not cooldowns else UNTIL_NEXT_SNAPSHOT
                       if min(cooldowns) <= 0 else max(cooldowns))
    return Aligned(tuple(latency), tuple(degraded), tuple(ejected),
                   any(u != NOT_EJECTED for u in ejected), any(degraded))


def health_key(health: Aligned, rule: PolicyRule) -> tuple[object, ...]:
    """What decide()'s choice reads of the health besides the ejections: for balanced, whose
    score weighs the latencies themselves, everything; otherwise the degraded flags, which
    latencies are unmeasured, the order of the penalised latencies (ties kept: latency ranks by
    them, cost falls back to them) and which are within the cost strategy's latency SLA."""
    if rule.strategy == "balanced":
        return (health.degraded_flags, health.latencies)
    measured = [0.0 if math.isnan(v) else v for v in health.latencies]
    penalised = [v * DEGRADED_PENALTY if d else v
                 for v, d in zip(measured, health.degraded_flags, strict=True)]
    levels = sorted(set(penalised))
    sla = rule.latency_sla_ms
    within = (tuple(math.isnan(v) or v <= sla for v in health.latencies)
              if rule.strategy == "cost" and sla > 0 else ())
    return (health.degraded_flags, tuple(math.isnan(v) for v in health.latencies),
            tuple(levels.index(v) for v in penalised), within)


class HealthTimeline:
    """The fleet health current at any time, moving forward only, from the history table.

    A model's aligned health is rebuilt only when a row of one of its candidates (the model's
    own on a provider, or the provider-wide one) has arrived since: `version(model)` says so.
    Rows are kept as (ewma_ms, state, ejected_until) and aligned as ext_proc's HealthView aligns
    the snapshot they make (`aligned_health`), without building the snapshot or numpy arrays:
    there is one alignment per model per history row, and few of them reach decide()."""

    def __init__(self, connection: sqlite3.Connection, table: RoutingTable, since_ms: int,
                 until_ms: int) -> None:
        self._table = table
        self._current: dict[tuple[str, str], Entry] = {
            (r.provider, r.model): (r.ewma_ms, r.state, r.ejected_until)
            for r in rows_at(connection, since_ms)}
        self._cursor = connection.execute(_HISTORY, (since_ms, until_ms))
        self._chunk: list[tuple] = []
        self._at = 0
        self.next_at = self._pull()
        """When the next history row takes effect (math.inf: none left)."""
        self._models_of = {provider: [name for name, route in table.models.items()
                                      if provider in route.providers]
                           for provider in table.providers}
        self._versions = dict.fromkeys(table.models, 0)
        self._aligned: dict[str, Aligned] = {}

    def _pull(self) -> float:
        if self._at >= len(self._chunk):
            self._chunk, self._at = self._cursor.fetchmany(FETCH), 0
        return self._chunk[self._at][0] if self._chunk else math.inf

    def advance(self, at_ms: int) -> None:
        while self.next_at <= at_ms:
            _, provider, model, ewma, state, until = self._chunk[self._at]
            self._at += 1
            self._current[provider, model] = (ewma, state, until)
            for name in (self._models_of.get(provider, ()) if not model else
                         (model,) if model in self._versions else ()):
                self._versions[name] += 1
                self._aligned.pop(name, None)
            self.next_at = self._pull()

    def version(self, model: str) -> int:
        return self._versions[model]

    def aligned(self, model: str) -> Aligned:
        found = self._aligned.get(model)
        if found is None:
            found = self._aligned[model] = aligned_health(self._table.models[model],
                                                          self._current)
        return found


