"""The fleet health the router decided on, kept over time in the ledger's database.

One row per (provider, model) aggregate (model "" for the provider as a whole, as in the
HealthSnapshot ext_proc receives) every `interval_s` (10 s by default) while its figures move,
every 10 minutes while they do not (an idle fleet writes little), and at once whenever its
state or ejection changes: an ejection can last less than an interval, and it is what a replay
or an explanation most needs to know. Rows go through the ledger's batched writer and are
pruned with its retention. `gpu-router replay` and `why` read them back (`rows_at`,
`stream_rows`) to rebuild the HealthSnapshot that was current at a given time.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import astuple, dataclass, fields

from control_plane.telemetry.health import FleetHealth, ProviderHealth
from gpu_router.api.v1 import health_pb2

INTERVAL_S = 10.0
HEARTBEAT_MS = 600_000
"""An aggregate whose figures did not move is written again this often..."""
LOOKBACK_MS = 3_600_000
"""...so a reader looking this far back finds every aggregate current at a time."""
STATES = {"healthy": health_pb2.HEALTHY, "degraded": health_pb2.DEGRADED,
          "ejected": health_pb2.EJECTED}


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthRow:
    """One (provider, model) aggregate at one instant; field order is the column order."""

    at_unix_ms: int
    provider: str
    model: str
    """Public model name, or "" for the provider as a whole."""
    ewma_ms: float | None
    """None while unmeasured."""
    ttfb_ms: float | None
    error_rate: float
    rate_429: float
    state: str
    """"healthy", "degraded" or "ejected"."""
    ejected_until: int
    """When an ejected aggregate is judged again (Unix ms); 0 when not ejected."""
    reason: str

    def values(self) -> tuple[object, ...]:
        return astuple(self)

    @classmethod
    def of(cls, health: ProviderHealth, at_unix_ms: int) -> HealthRow:
        return cls(at_unix_ms=at_unix_ms, provider=health.provider, model=health.model,
                   ewma_ms=health.ewma_latency_ms if health.latency_samples else None,
                   ttfb_ms=health.ewma_ttfb_ms, error_rate=health.error_rate,
                   rate_429=health.rate_429, state=health.state.value,
                   ejected_until=health.cooldown_until_unix_ms, reason=health.reason)


HISTORY_COLUMNS = tuple(f.name for f in fields(HealthRow))
HISTORY_SCHEMA = (
    ("CREATE TABLE IF NOT EXISTS health_history (at_unix_ms INTEGER NOT NULL, "
     "provider TEXT NOT NULL, model TEXT NOT NULL, ewma_ms REAL, ttfb_ms REAL, "
     "error_rate REAL NOT NULL, rate_429 REAL NOT NULL, state TEXT NOT NULL, "
     "ejected_until INTEGER NOT NULL, reason TEXT NOT NULL)"),
    "CREATE INDEX IF NOT EXISTS health_history_at ON health_history (at_unix_ms)",
    ("CREATE INDEX IF NOT EXISTS health_history_key_at "
     "ON health_history (provider, model, at_unix_ms)"),
)
HISTORY_INSERT = (f"INSERT INTO health_history ({', '.join(HISTORY_COLUMNS)}) "
                  f"VALUES ({', '.join('?' for _ in HISTORY_COLUMNS)})")
_SELECT = f"SELECT {', '.join(HISTORY_COLUMNS)} FROM health_history"


class HistorySampler:
    """Which aggregates are due a row: any whose state or ejection changed since its last row;
    every `interval_ms` one whose figures moved; and every HEARTBEAT_MS one that sat still (an
    idle fleet writes little, and a reader's LOOKBACK_MS always finds every aggregate).
    Pure: time is passed in."""

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        """An interval longer than the heartbeat is the heartbeat."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._interval_ms = min(int(interval_s * 1000), HEARTBEAT_MS)
        self._last: dict[tuple[str, str], HealthRow] = {}

    def due(self, entries: Iterable[ProviderHealth], now_ms: int) -> list[HealthRow]:
        rows = []
        for health in entries:
            row = HealthRow.of(health, now_ms)
            last = self._last.get((row.provider, row.model))
            if last is None or _changed(last, row, self._interval_ms):
                rows.append(row)
                self._last[row.provider, row.model] = row
        return rows


def _changed(last: HealthRow, row: HealthRow, interval_ms: int) -> bool:
    if (last.state, last.ejected_until) != (row.state, row.ejected_until):
        return True
    age = row.at_unix_ms - last.at_unix_ms
    moved = (last.ewma_ms, last.ttfb_ms, last.error_rate, last.rate_429, last.reason) != (
        row.ewma_ms, row.ttfb_ms, row.error_rate, row.rate_429, row.reason)
    return age >= HEARTBEAT_MS or (moved and age >= interval_ms)


async def record_health(fleet: FleetHealth, add: Callable[[HealthRow], None], *,
                        interval_s: float = INTERVAL_S, tick_s: float = 0.5,
                        clock: Callable[[], float] = time.time) -> None:
    """Run until cancelled: every `tick_s`, hand `add` the rows the sampler says are due."""
    sampler = HistorySampler(interval_s)
    while True:
        now_ms = int(clock() * 1000)
        for row in sampler.due(fleet.entries(now_ms), now_ms):
            add(row)
        await asyncio.sleep(min(tick_s, interval_s))


def _row(values: tuple[object, ...]) -> HealthRow:
    return HealthRow(**dict(zip(HISTORY_COLUMNS, values, strict=True)))  # type: ignore[arg-type]


def rows_at(connection: sqlite3.Connection, at_unix_ms: int) -> list[HealthRow]:
    """The latest row of every (provider, model) written in the LOOKBACK_MS up to
    `at_unix_ms` (each is written every interval, so the current ones are there; the index on
    (provider, model, at) makes this one seek per aggregate)."""
    keys = connection.execute(
        "SELECT DISTINCT provider, model FROM health_history WHERE at_unix_ms > ? "
        "AND at_unix_ms <= ?", (at_unix_ms - LOOKBACK_MS, at_unix_ms)).fetchall()
    found = []
    for provider, model in keys:
        values = connection.execute(
            f"{_SELECT} WHERE provider = ? AND model = ? AND at_unix_ms <= ? "
            "ORDER BY at_unix_ms DESC LIMIT 1", (provider, model, at_unix_ms)).fetchone()
        if values is not None:
            found.append(_row(values))
    return found


def stream_rows(connection: sqlite3.Connection, after_unix_ms: int, until_unix_ms: int,
                batch: int = 5000) -> Iterator[HealthRow]:
    """Rows with after < at <= until, oldest first, a batch at a time."""
    cursor = connection.execute(
        f"{_SELECT} WHERE at_unix_ms > ? AND at_unix_ms <= ? ORDER BY at_unix_ms",
        (after_unix_ms, until_unix_ms))
    while chunk := cursor.fetchmany(batch):
        yield from map(_row, chunk)


def snapshot_of(rows: Iterable[HealthRow], at_unix_ms: int) -> health_pb2.HealthSnapshot:
    """The HealthSnapshot these rows describe, as the control plane would have published it."""
    snapshot = health_pb2.HealthSnapshot(generated_at_unix_ms=at_unix_ms)
    for row in rows:
        snapshot.entries.add(
            provider=row.provider, model=row.model, ewma_latency_ms=row.ewma_ms or 0.0,
            ewma_ttfb_ms=row.ttfb_ms or 0.0, samples=0 if row.ewma_ms is None else 1,
            error_rate=row.error_rate, rate_429=row.rate_429, state=STATES[row.state],
            cooldown_until_unix_ms=row.ejected_until)
    return snapshot
