"""The dashboard's savings card: `gpu-router savings` over the last day, refreshed off the loop.

A savings figure is one scan of the ledger's window (control_plane/ledger/savings.py), seconds on
a large ledger, so it is never computed per dashboard poll nor on the event loop: a task asks
a worker thread for it every `interval_s` and the dashboard reads the last summary.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from control_plane.ledger.report import ReportError
from control_plane.ledger.savings import Baseline, Savings, build_savings
from control_plane.policy.model import RoutingConfig

WINDOW = timedelta(hours=24)
INTERVAL_S = 60.0

log = logging.getLogger(__name__)


def _baseline(baseline: Baseline | None) -> dict[str, Any] | None:
    if baseline is None:
        return None
    return {"cost_usd": baseline.cost_usd, "savings_usd": baseline.savings_usd,
            "savings_pct": baseline.savings_pct}


def card(savings: Savings) -> dict[str, Any]:
    """What the card draws: totals, both baselines, and per model its cheapest provider."""
    return {
        "since": savings.since.isoformat(), "until": savings.until.isoformat(),
        "requests": savings.requests, "actual_usd": savings.actual_usd,
        "vs_cheapest": _baseline(savings.vs_cheapest),
        "vs_most_used": _baseline(savings.vs_most_used),
        "models": [{"model": m.model, "requests": m.requests, "actual_usd": m.actual_usd,
                    "cheapest": None if m.cheapest is None else m.cheapest.provider,
                    "cheapest_usd": None if m.cheapest is None else m.cheapest.cost_usd}
                   for m in savings.models],
        "failed_over": savings.failed_over, "unrouted": savings.unrouted,
    }


class SavingsCard:
    def __init__(self, ledger: Path, config: Callable[[], RoutingConfig | None],
                 interval_s: float = INTERVAL_S) -> None:
        self._ledger = ledger
        self._config = config
        self._interval_s = interval_s
        self.summary: dict[str, Any] | None = None
        """None until the first figure (or while the ledger does not exist yet)."""

    def refresh(self) -> None:
        """One figure, in the calling (worker) thread."""
        config = self._config()
        if config is None or not self._ledger.is_file():
            return
        try:
            self.summary = card(build_savings(self._ledger, config, WINDOW, datetime.now(UTC)))
        except ReportError as error:
            log.warning("savings card not refreshed", extra={"error": str(error)})

    async def run(self) -> None:
        """Refresh every interval until cancelled."""
        while True:
            await asyncio.to_thread(self.refresh)
            await asyncio.sleep(self._interval_s)
