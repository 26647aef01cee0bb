"""weights (pure) and publish_weights (pushes on change, spaced by min_gap_s, always the latest)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from telemetry_fixtures import T0, FakeClock, eventually, sample

from control_plane.telemetry.health import FleetHealth
from control_plane.telemetry.weights import fitted, publish_weights, watched, weights


def test_weights_follow_provider_wide_state() -> None:
    fleet = FleetHealth(eject_error_rate=0.5, eject_min_samples=2)
    for i in range(2):
        fleet.record(sample(T0 + i, 503, provider="down"))
    for i, status in enumerate([200, 200, 200, 503]):
        fleet.record(sample(T0 + i, status, provider="flaky"))
    fleet.record(sample(T0, 200, provider="fine"))
    assert weights(fleet.entries(T0 + 5), ["fine", "flaky", "down", "unseen"]) == {
        "fine": 100,
        "flaky": 50,
        "down": 0,
        "unseen": 100,
    }


def test_weights_only_for_the_providers_asked() -> None:
    fleet = FleetHealth()
    fleet.record(sample(T0, 200, provider="retired"))
    assert weights(fleet.entries(T0), []) == {}
    assert weights(fleet.entries(T0), ["new"]) == {"new": 100}


def test_degraded_and_ejected_providers_are_watched() -> None:
    assert watched({"fine": 100, "flaky": 50, "down": 0}) == {"flaky", "down"}
    assert watched({}) == frozenset()


def test_weights_fitted_to_a_new_policy_drop_the_removed_and_presume_the_added_healthy() -> None:
    assert fitted({"kept": 50, "removed": 0}, ["kept", "added"]) == {"kept": 50, "added": 100}


async def _run_publisher() -> None:
    fleet = FleetHealth(eject_min_samples=1, cooldown_s=60.0)
    clock = FakeClock(T0)
    providers = ["a", "b"]
    pushed: list[Mapping[str, int]] = []
    task = asyncio.create_task(
        publish_weights(
            fleet, lambda: providers, pushed.append, interval_s=0.001, min_gap_s=1.0, clock=clock
        )
    )
    try:
        await eventually(lambda: len(pushed) == 1, "the first weights")
        assert pushed[0] == {"a": 100, "b": 100}
        assert fleet.to_json(T0)["weights"] == {"a": 100, "b": 100}

        fleet.record(sample(T0 + 1, 503, provider="a"))
        clock.unix_ms = T0 + 999  # within the gap: held back
        await asyncio.sleep(0.03)
        assert len(pushed) == 1
        providers.append("c")  # a reload adds a provider while the change waits
        clock.unix_ms = T0 + 1_000
        await eventually(lambda: len(pushed) == 2, "the weights after the gap")
        assert pushed[1] == {"a": 0, "b": 100, "c": 100}  # the latest, not the first change
        assert fleet.to_json(T0 + 1_000)["weights"] == pushed[1]

        clock.unix_ms = T0 + 5_000
        await asyncio.sleep(0.03)
        assert len(pushed) == 2  # nothing changed: nothing pushed
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()


def test_publishes_on_change_spaced_by_the_gap() -> None:
    asyncio.run(_run_publisher())


async def _run_with_failing_consumer() -> None:
    fleet = FleetHealth()
    calls: list[Mapping[str, int]] = []

    def flaky(current: Mapping[str, int]) -> None:
        calls.append(current)
        if len(calls) == 1:
            raise ConnectionError("translate failed")

    task = asyncio.create_task(
        publish_weights(fleet, lambda: ["a"], flaky, interval_s=0.001, clock=FakeClock(T0))
    )
    try:
        await eventually(lambda: len(calls) >= 2, "a retry after the failed publish")
        assert calls[0] == calls[1] == {"a": 100}
        await asyncio.sleep(0.02)
        assert len(calls) == 2
        assert fleet.to_json(T0)["weights"] == {"a": 100}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_failed_publish_is_retried() -> None:
    asyncio.run(_run_with_failing_consumer())
