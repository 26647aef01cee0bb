"""Pushes the fleet's health to the xDS server whenever it changes.

Samples arrive continuously, so publishing on every record would flood ext_proc replicas;
instead the fleet is looked at every `interval_s` and published when its version moved.
Each look also refreshes the fleet to the current time, so a cooldown that ends or an
error window that empties is published even when no traffic arrives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from control_plane.telemetry.health import FleetHealth
from gpu_router.api.v1 import health_pb2

logger = logging.getLogger(__name__)


async def publish_health(
    fleet: FleetHealth,
    publish: Callable[[health_pb2.HealthSnapshot], None],
    interval_s: float = 0.2,
    clock: Callable[[], float] = time.time,
) -> None:
    """Run until cancelled; the first snapshot (possibly empty) is published at once."""
    published: int | None = None
    while True:
        now_ms = int(clock() * 1000)
        fleet.refresh(now_ms)
        if fleet.version != published:
            version = fleet.version
            try:
                publish(fleet.snapshot_proto(now_ms))
            except Exception:
                # The publisher must outlive a failing consumer; the next tick retries.
                logger.exception(
                    "publishing the health snapshot failed", extra={"version": version}
                )
            else:
                published = version
                fleet.record_published(version)
        await asyncio.sleep(interval_s)
