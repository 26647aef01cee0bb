"""publish_health: publishes on change, re-evaluates with time, survives a failing consumer."""

from __future__ import annotations

import asyncio

from telemetry_fixtures import T0, FakeClock, eventually, sample

from control_plane.telemetry.health import FleetHealth
from control_plane.telemetry.publisher import publish_health
from gpu_router.api.v1 import health_pb2


async def _run_publisher() -> None:
    fleet = FleetHealth(eject_min_samples=1, cooldown_s=5.0)
    clock = FakeClock(T0)
    published: list[health_pb2.HealthSnapshot] = []
    task = asyncio.create_task(
        publish_health(fleet, published.append, interval_s=0.001, clock=clock)
    )
    try:
        await eventually(lambda: len(published) == 1, "the first (empty) snapshot")
        assert list(published[0].entries) == [] and published[0].generated_at_unix_ms == T0

        await asyncio.sleep(0.02)  # many ticks with nothing new: nothing republished
        assert len(published) == 1

        fleet.record(sample(T0, 503))
        assert fleet.to_json(T0)["published_version"] < fleet.version  # not sent out yet
        await eventually(lambda: len(published) == 2, "the snapshot with the ejection")
        assert fleet.to_json(T0)["published_version"] == fleet.version
        assert {(e.model, e.state) for e in published[1].entries} == {
            ("", health_pb2.EJECTED),
            ("m1", health_pb2.EJECTED),
        }

        clock.unix_ms = T0 + 5_000  # cooldown over, with no new traffic at all
        await eventually(lambda: len(published) == 3, "the snapshot after the cooldown")
        assert {e.state for e in published[2].entries} == {health_pb2.HEALTHY}
        assert published[2].generated_at_unix_ms == T0 + 5_000
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()


def test_publishes_changes_and_cooldown_expiry() -> None:
    asyncio.run(_run_publisher())


async def _run_with_failing_consumer() -> None:
    fleet = FleetHealth()
    calls: list[health_pb2.HealthSnapshot] = []

    def flaky(snapshot: health_pb2.HealthSnapshot) -> None:
        calls.append(snapshot)
        if len(calls) == 1:
            raise ConnectionError("xDS server not ready")

    task = asyncio.create_task(publish_health(fleet, flaky, interval_s=0.001, clock=FakeClock(T0)))
    try:
        await eventually(lambda: len(calls) >= 2, "a retry after the failed publish")
        assert calls[0] == calls[1]
        await asyncio.sleep(0.02)
        assert len(calls) == 2  # once delivered, the same version is not sent again
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_failed_publish_is_retried() -> None:
    asyncio.run(_run_with_failing_consumer())
