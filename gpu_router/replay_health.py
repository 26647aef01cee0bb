"""The fleet health that was current at each recorded request, for `gpu-router replay`.

A model's health changes only when a history row of one of its candidates arrives (the model's
own on a provider, or the provider-wide one) or an ejection's cooldown ends: `Periods` cuts the
window there and aligns every period at once with numpy, as ext_proc's HealthView would align
the HealthSnapshot those rows make (`aligned_health`, kept as the reference for one period).
`health_key` is what decide()'s choice reads of an alignment besides the ejections, so
consecutive periods with equal keys and ejections (an interval) decide alike: a 30-day window
has far fewer intervals than periods, and the requests are summed per interval in SQL.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from itertools import chain, combinations

import numpy as np
import numpy.typing as npt

from control_plane.ledger.health_history import LOOKBACK_MS
from ext_proc.health_view import DEGRADED_PENALTY, NOT_EJECTED, UNTIL_NEXT_SNAPSHOT, CandidateHealth
from ext_proc.routing_table import ModelRoute, PolicyRule, RoutingTable

_COLUMNS = ("SELECT at_unix_ms, ifnull(ewma_ms, -1.0), (state = 'degraded') + 2 * (state = 'ejected'), "
            "ejected_until FROM health_history WHERE provider = ? AND model = ? ")
"""Four numbers a row (an EWMA is never negative: -1 is unmeasured), read straight into numpy."""
FETCH = 20_000
_LATEST = _COLUMNS + "AND at_unix_ms <= ? ORDER BY at_unix_ms DESC LIMIT 1"
_WINDOW = _COLUMNS + "AND at_unix_ms > ? AND at_unix_ms <= ? ORDER BY at_unix_ms"
Entry = tuple[float | None, str, int]
"""A health history row's (ewma_ms, state, ejected_until), as `aligned_health` takes them."""


@dataclass(frozen=True, slots=True)
class Aligned:
    """One model's candidates' health as decide() reads it (CandidateHealth's plain fields)."""

    latencies: tuple[float, ...]
    """EWMA total latency; NaN when unmeasured."""
    degraded_flags: tuple[bool, ...]
    ejected_until: tuple[int, ...]
    any_ejected: bool

    @classmethod
    def of(cls, health: CandidateHealth) -> Aligned:
        return cls(health.latencies, health.degraded_flags, health.ejected_until,
                   health.any_ejected)

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
                   any(u != NOT_EJECTED for u in ejected))


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


def kind_of(rule: PolicyRule) -> tuple[object, ...]:
    """Rules whose health_key reads the same things share intervals: balanced reads every
    latency, the others the order of the latencies (and cost, which is within its SLA)."""
    if rule.strategy == "balanced":
        return ("balanced",)
    return ("order", rule.latency_sla_ms if rule.strategy == "cost" else 0.0)


@dataclass(frozen=True, slots=True)
class History:
    """One (provider, model) aggregate's rows that matter to a window, oldest first: the one
    current at its start (as rows_at finds it) and those inside it."""

    at: npt.NDArray[np.int64]
    latency: npt.NDArray[np.float64]
    """NaN while unmeasured."""
    degraded: npt.NDArray[np.bool_]
    ejected: npt.NDArray[np.bool_]
    until: npt.NDArray[np.int64]

    @classmethod
    def read(cls, connection: sqlite3.Connection, provider: str, model: str, since_ms: int,
             until_ms: int) -> History:
        current = connection.execute(_LATEST, (provider, model, since_ms)).fetchone()
        parts = ([np.array(current, dtype=np.float64)]
                 if current is not None and current[0] > since_ms - LOOKBACK_MS else [])
        cursor = connection.execute(_WINDOW, (provider, model, since_ms, until_ms))
        while rows := cursor.fetchmany(FETCH):  # a chunk at a time: as tuples they are large
            parts.append(np.fromiter(chain.from_iterable(rows), dtype=np.float64,
                                     count=4 * len(rows)))
        values = np.concatenate(parts or [np.empty(0)]).reshape(-1, 4)
        return cls(values[:, 0].astype(np.int64), np.where(values[:, 1] < 0, math.nan,
                                                          values[:, 1]),
                   values[:, 2] == 1, values[:, 2] == 2, values[:, 3].astype(np.int64))

    def at_times(self, times: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.bool_],
                                                            npt.NDArray[np.intp]]:
        """Whether a row is current at each time, and which (0 where none is)."""
        index = np.searchsorted(self.at, times, side="right") - 1
        return index >= 0, np.maximum(index, 0)


_NEVER = np.iinfo(np.int64).max


def union(times: list[npt.NDArray[np.int64]]) -> npt.NDArray[np.int64]:
    """The distinct times of sorted arrays, sorted (a stable sort merges their runs)."""
    merged = np.sort(np.concatenate(times), kind="stable")
    return merged[np.concatenate(([True], merged[1:] != merged[:-1]))]


def _align(pairs: list[tuple[History, History]], starts: npt.NDArray[np.int64]
           ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """aligned_health at every start: latencies, degraded flags, ejected_until (period x
    candidate), from each candidate's (model's own, provider-wide) histories."""
    shape = (len(starts), len(pairs))
    latency, degraded = np.full(shape, math.nan), np.zeros(shape, dtype=np.bool_)
    until = np.full(shape, NOT_EJECTED, dtype=np.int64)
    for column, entries in enumerate(pairs):  # a column at a time: few temporaries at once
        low, high = np.full(len(starts), _NEVER), np.full(len(starts), -_NEVER)
        for history in reversed(entries):  # the model's own EWMA wins over the provider's
            if not len(history.at):
                continue
            has, index = history.at_times(starts)
            measured = has & ~np.isnan(history.latency[index])
            latency[measured, column] = history.latency[index][measured]
            degraded[:, column] |= has & history.degraded[index]
            ejected, cooldown = has & history.ejected[index], history.until[index]
            low = np.where(ejected, np.minimum(low, cooldown), low)
            high = np.where(ejected, np.maximum(high, cooldown), high)
        until[:, column] = np.where(low == _NEVER, NOT_EJECTED,
                                    np.where(low <= 0, UNTIL_NEXT_SNAPSHOT, high))
    return latency, degraded, until


def _differs(values: npt.NDArray[np.bool_] | npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Per period, whether any candidate's value differs from the period before (NaN = NaN)."""
    same = values[1:] == values[:-1]
    if values.dtype.kind == "f":
        same |= np.isnan(values[1:]) & np.isnan(values[:-1])
    return np.concatenate(([True], ~same.all(axis=1)))


@dataclass(frozen=True, slots=True)
class Periods:
    """One model's candidates' health over a window, one row per period in which it does not
    change: a period starts at the window's start, at each history row of a candidate and where
    an ejection's cooldown ends (so the ejections hold all period long)."""

    starts: npt.NDArray[np.int64]
    latencies: npt.NDArray[np.float64]
    degraded: npt.NDArray[np.bool_]
    ejected_until: npt.NDArray[np.int64]
    ejected: npt.NDArray[np.bool_]
    """Which candidates an ejection holds during the period (ejected at any time in it)."""
    order_changes: npt.NDArray[np.bool_]
    """Periods where health_key changes for every strategy but balanced (its SLA aside)..."""
    balanced_changes: npt.NDArray[np.bool_]
    """...and for balanced; both with the ejections."""
    degraded_flags: frozenset[tuple[bool, ...]]
    """The distinct degraded flags the window has."""

    @classmethod
    def of(cls, pairs: list[tuple[History, History]], since_ms: int, until_ms: int) -> Periods:
        """`pairs`: each candidate's (model's own, provider-wide) history, in route order;
        periods for since <= at < until."""
        starts = union([np.array([since_ms], dtype=np.int64)]
                       + [history.at[(history.at > since_ms) & (history.at < until_ms)]
                          for entries in pairs for history in entries])
        latency, degraded, until = _align(pairs, starts)
        ends = np.append(starts[1:], until_ms)[:, None]
        ending = (until > starts[:, None]) & (until < ends)
        if ending.any():
            starts = union([starts, until[ending]])
            del latency, degraded  # before aligning anew: one set of arrays at a time
            latency, degraded, until = _align(pairs, starts)
        ejected = (until == UNTIL_NEXT_SNAPSHOT) | (until > starts[:, None])
        common = _differs(degraded) | _differs(ejected)
        unmeasured = np.isnan(latency)
        penalised = np.where(unmeasured, 0.0, latency)
        penalised = np.where(degraded, penalised * DEGRADED_PENALTY, penalised)
        count = latency.shape[1]
        ij = list(combinations(range(count), 2))  # every pair of candidates
        order = common | _differs(unmeasured)
        if ij:
            order |= _differs(np.stack([penalised[:, i] < penalised[:, j] for i, j in ij], 1))
            order |= _differs(np.stack([penalised[:, i] == penalised[:, j] for i, j in ij], 1))
        packed = np.unique(degraded @ (1 << np.arange(count)))
        flags = frozenset(tuple(bool(code >> i & 1) for i in range(count))
                          for code in packed.tolist())
        return cls(starts, latency, degraded, until, ejected, order,
                   common | _differs(latency), flags)

    def aligned(self, period: int) -> Aligned:
        until = tuple(self.ejected_until[period].tolist())
        return Aligned(tuple(self.latencies[period].tolist()),
                       tuple(self.degraded[period].tolist()), until,
                       any(u != NOT_EJECTED for u in until))

    def intervals(self, rule: PolicyRule) -> npt.NDArray[np.intp]:
        """The first period of each interval: periods where health_key(rule) or the ejections
        change (computed as health_key computes them, for all periods at once)."""
        if rule.strategy == "balanced":
            return np.flatnonzero(self.balanced_changes)
        changed = self.order_changes
        if rule.strategy == "cost" and rule.latency_sla_ms > 0:
            latency = self.latencies
            changed = changed | _differs(np.isnan(latency) | (latency <= rule.latency_sla_ms))
        return np.flatnonzero(changed)


def read_periods(connection: sqlite3.Connection, table: RoutingTable, since_ms: int,
                 until_ms: int) -> dict[str, Periods]:
    """Every model's Periods over since <= at < until, from the history table (one indexed
    range per aggregate, read into numpy; provider-wide ones once, a model's own only while
    its periods are built, so few histories are held at a time)."""
    wide: dict[str, History] = {}
    found = {}
    for name, route in table.models.items():
        for provider in route.providers:
            if provider not in wide:
                wide[provider] = History.read(connection, provider, "", since_ms, until_ms)
        found[name] = Periods.of(
            [(History.read(connection, provider, name, since_ms, until_ms), wide[provider])
             for provider in route.providers], since_ms, until_ms)
    return found
