"""The restart policy of `gpu-router up`'s supervisor: delays double from the first quick exit
up to a ceiling, and a run that lasted starts them over."""

from __future__ import annotations

import pytest

from gpu_router.backoff import Backoff, ChildRecord, after_exit

POLICY = Backoff(initial_s=0.5, factor=2.0, maximum_s=30.0, stable_after_s=60.0)


def delays(uptimes: list[float]) -> list[float]:
    record, out = ChildRecord(), []
    for uptime in uptimes:
        plan = after_exit(record, uptime, POLICY)
        record = plan.record
        out.append(plan.delay_s)
    return out


def test_quick_exits_double_the_delay_up_to_the_ceiling() -> None:
    assert delays([1.0] * 9) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_a_run_that_lasted_starts_the_delays_over() -> None:
    assert delays([1.0, 1.0, 1.0, 60.0, 1.0]) == [0.5, 1.0, 2.0, 0.5, 1.0]
    assert delays([59.9, 59.9]) == [0.5, 1.0]


def test_every_exit_counts_one_restart() -> None:
    record = ChildRecord()
    for uptime in (1.0, 100.0, 1.0):
        record = after_exit(record, uptime, POLICY).record
    assert record == ChildRecord(restarts=3, quick_exits=2)


def test_the_first_exit_waits_the_initial_delay_whatever_the_uptime() -> None:
    assert after_exit(ChildRecord(), 0.0, POLICY).delay_s == 0.5
    assert after_exit(ChildRecord(), 3600.0, POLICY).delay_s == 0.5


@pytest.mark.parametrize("fields", [
    {"initial_s": 0.0}, {"initial_s": 40.0}, {"factor": 0.5}, {"stable_after_s": 0.0},
])
def test_an_inconsistent_policy_is_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="inconsistent backoff"):
        Backoff(**fields)
