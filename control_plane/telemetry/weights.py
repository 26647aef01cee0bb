"""Cluster weights for Envoy's fallback route, derived from fleet health.

When ext_proc is unavailable (failure_mode_allow), Envoy routes on the fallback route, whose
priority groups the control plane orders by these weights (highest first, 0 left out). So a
provider the fleet has ejected is not where Envoy sends traffic while ext_proc is down. A
provider weighed below a healthy one is `watched`: every Envoy's outlier detection for it
ejects on the first failure (translate/clusters.py watchful).

`weights` is pure; `publish_weights` is the loop that pushes them when they change. Every push
re-translates and rolls out Envoy config, so pushes are spaced by at least `min_gap_s`, and the
value pushed at the end of a gap is always the latest.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from control_plane.telemetry.health import PROVIDER_WIDE, FleetHealth, HealthState, ProviderHealth

logger = logging.getLogger(__name__)

STATE_WEIGHTS = {HealthState.EJECTED: 0, HealthState.DEGRADED: 50, HealthState.HEALTHY: 100}
UNMEASURED_WEIGHT = 100
"""A provider the fleet has not seen yet is presumed healthy."""


def weights(fleet_view: Iterable[ProviderHealth], providers: Iterable[str]) -> dict[str, int]:
    """Weight per provider from its provider-wide health (the fallback route is model-agnostic)."""
    states = {view.provider: view.state for view in fleet_view if view.model == PROVIDER_WIDE}
    return {
        name: STATE_WEIGHTS[states[name]] if name in states else UNMEASURED_WEIGHT
        for name in providers
    }


def fitted(weights: Mapping[str, int], providers: Iterable[str]) -> dict[str, int]:
    """Weights computed before a policy change, fitted to the new policy's providers (one not
    weighed yet is presumed healthy) until the next computation."""
    return {name: weights.get(name, UNMEASURED_WEIGHT) for name in providers}


def watched(weights: Mapping[str, int]) -> frozenset[str]:
    """The providers the fleet found degraded or ejected."""
    healthy = STATE_WEIGHTS[HealthState.HEALTHY]
    return frozenset(name for name, weight in weights.items() if weight < healthy)


async def publish_weights(
    fleet: FleetHealth,
    providers: Callable[[], Sequence[str]],
    publish: Callable[[Mapping[str, int]], None],
    interval_s: float = 0.2,
    min_gap_s: float = 1.0,
    clock: Callable[[], float] = time.time,
) -> None:
    """Run until cancelled: publish the weights at once, then whenever they change.

    `providers` is called on every look, so a policy reload that adds or removes a provider
    changes the weights too. A failing `publish` is logged and retried on the next look.
    """
    pushed: dict[str, int] | None = None
    pushed_at = -math.inf
    while True:
        now = clock()
        now_ms = int(now * 1000)
        current = weights(fleet.entries(now_ms), providers())
        if current != pushed and now - pushed_at >= min_gap_s:
            try:
                publish(current)
            except Exception:
                # The loop must outlive a failing consumer; the next look retries.
                logger.exception(
                    "publishing the cluster weights failed", extra={"weights": current}
                )
            else:
                pushed, pushed_at = current, now
                fleet.record_pushed_weights(current, now_ms)
        await asyncio.sleep(interval_s)
