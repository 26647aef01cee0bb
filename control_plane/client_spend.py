"""What each client with a budget has spent in its rolling window, pushed to every ext_proc.

The cost is the ledger's: every request booked (accounting.py) adds its cost, which already
includes what a failed-over request cost as booked. At start, and when a client's window
changes, the sums are read back from the ledger, so a restart forgets nothing that was
committed. Each window is kept as BUCKETS buckets (30d: 1 hour each), so spend leaves the
window one bucket at a time. Without a ledger, only what this process booked counts.

The snapshot goes out as the ClientSpendSnapshot xDS resource whenever a sum changes (checked
every PUBLISH_INTERVAL_S), so a spent budget bites on every replica within about a second of
the request that spent it being booked (Envoy flushes access logs every 100 ms).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from control_plane.policy.model import Budget, RoutingConfig
from gpu_router.api.v1 import clients_pb2

BUCKETS = 720
PUBLISH_INTERVAL_S = 0.25

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Window:
    budget: Budget
    buckets: dict[int, float] = field(default_factory=dict)
    """Bucket index (start time // width) -> USD."""

    @property
    def width_ms(self) -> int:
        return max(1000, self.budget.window_s * 1000 // BUCKETS)

    def add(self, at_unix_ms: int, cost: float) -> None:
        index = at_unix_ms // self.width_ms
        self.buckets[index] = self.buckets.get(index, 0.0) + cost

    def spent(self, now_ms: int) -> float:
        """Sum of the buckets inside the window ending now (older buckets are dropped)."""
        oldest = (now_ms - self.budget.window_s * 1000) // self.width_ms + 1
        stale = [index for index in self.buckets if index < oldest]
        for index in stale:
            del self.buckets[index]
        return sum(self.buckets.values())


@dataclass(slots=True)
class ClientTotals:
    """What one client did since this control plane started (the dashboard's table)."""

    requests: int = 0
    errors: int = 0
    """No response, 429 (its budget and rate-limit refusals included) or 5xx."""
    tokens: int = 0
    """Input plus output tokens."""
    cost_usd: float = 0.0


def ledger_buckets(path: Path, client: str, window: _Window, now_ms: int) -> dict[int, float]:
    """The client's committed cost in the window, bucketed like `window`."""
    width = window.width_ms
    since = now_ms - window.budget.window_s * 1000
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "SELECT at_unix_ms / ?, SUM(cost_usd) FROM requests "
            "WHERE client = ? AND at_unix_ms > ? GROUP BY 1", (width, client, since)).fetchall()
    finally:
        connection.close()
    return {int(index): float(total) for index, total in rows}


class ClientSpend:
    """Rolling spend per budgeted client (the policy's clients with a budget)."""

    def __init__(self, ledger: Path | None, clock: Callable[[], float] = time.time) -> None:
        self._ledger = ledger
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._declared: tuple[str, ...] = ()
        self._totals: dict[str, ClientTotals] = {}

    def use_policy(self, config: RoutingConfig) -> None:
        """Follow the policy's budgets; a new client, or a changed window, is read back from
        the ledger."""
        now_ms = int(self._clock() * 1000)
        self._declared = tuple(client.name for client in config.clients)
        windows: dict[str, _Window] = {}
        for client in config.clients:
            if client.budget is None:
                continue
            old = self._windows.get(client.name)
            if old is not None and old.budget.window_s == client.budget.window_s:
                old.budget = client.budget
                windows[client.name] = old
                continue
            window = windows[client.name] = _Window(client.budget)
            window.buckets = self._read_ledger(client.name, window, now_ms)
        self._windows = windows

    def _read_ledger(self, client: str, window: _Window, now_ms: int) -> dict[int, float]:
        if self._ledger is None or not self._ledger.exists():
            return {}
        try:
            return ledger_buckets(self._ledger, client, window, now_ms)
        except sqlite3.Error as error:
            log.warning("client spend not read from the ledger",
                        extra={"client": client, "ledger": str(self._ledger), "error": str(error)})
            return {}

    def add(self, client: str, at_unix_ms: int, cost_usd: float, *, error: bool = False,
            tokens: int = 0) -> None:
        """One booked request of `client`: its cost counts against a budget, if it has one."""
        totals = self._totals.setdefault(client, ClientTotals())
        totals.requests += 1
        totals.errors += error
        totals.tokens += tokens
        totals.cost_usd += cost_usd
        window = self._windows.get(client)
        if window is not None and cost_usd:
            window.add(at_unix_ms, cost_usd)

    def spent(self) -> dict[str, float]:
        """Client -> USD in its window ending now."""
        now_ms = int(self._clock() * 1000)
        return {name: window.spent(now_ms) for name, window in self._windows.items()}

    def rows(self) -> list[dict[str, object]]:
        """Per declared client (then any other seen since start): totals since start, budget,
        spend in its window and what remains."""
        spent = self.spent()
        names = [*self._declared, *sorted(set(self._totals) - set(self._declared))]
        rows: list[dict[str, object]] = []
        for name in names:
            budget = self._windows[name].budget if name in self._windows else None
            rows.append({
                "client": name, **asdict(self._totals.get(name, ClientTotals())),
                "budget_usd": None if budget is None else budget.usd,
                "window_s": None if budget is None else budget.window_s,
                "spent_usd": spent.get(name),
                "remaining_usd": None if budget is None else max(budget.usd - spent[name], 0.0),
            })
        return rows


def snapshot_proto(spent: Mapping[str, float], now_ms: int) -> clients_pb2.ClientSpendSnapshot:
    return clients_pb2.ClientSpendSnapshot(
        clients=[clients_pb2.ClientSpend(client=name, spent_usd=usd)
                 for name, usd in sorted(spent.items())],
        generated_at_unix_ms=now_ms,
    )


async def publish_spend(
    spend: ClientSpend,
    publish: Callable[[clients_pb2.ClientSpendSnapshot], None],
    interval_s: float = PUBLISH_INTERVAL_S,
    clock: Callable[[], float] = time.time,
) -> None:
    """Run until cancelled; publish at once, then whenever some client's spend changed."""
    published: dict[str, float] | None = None
    while True:
        spent = spend.spent()
        if spent != published:
            try:
                publish(snapshot_proto(spent, int(clock() * 1000)))
            except Exception:
                # Like the health publisher: outlive a failing consumer; the next tick retries.
                log.exception("publishing client spend failed")
            else:
                published = spent
        await asyncio.sleep(interval_s)
