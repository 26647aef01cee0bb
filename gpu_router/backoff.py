"""When `gpu-router up` restarts a child that exited: the pure policy, no processes, no clock.

A child that keeps crashing right after it starts is restarted ever more slowly (0.5 s, 1 s,
2 s ... up to 30 s), so a broken one does not spin a core; one that ran for a while before
it exited is restarted at the shortest delay again, as a first crash would be.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    initial_s: float = 0.5
    factor: float = 2.0
    maximum_s: float = 30.0
    stable_after_s: float = 60.0
    """A run at least this long was healthy: the exit after it starts the delays over."""

    def __post_init__(self) -> None:
        growing = 0 < self.initial_s <= self.maximum_s and self.factor >= 1
        if not growing or self.stable_after_s <= 0:
            raise ValueError(f"inconsistent backoff {self!r}")

    def delay(self, quick_exits: int) -> float:
        """Wait before the restart that follows `quick_exits` short runs in a row (>= 1)."""
        return min(self.initial_s * self.factor ** (quick_exits - 1), self.maximum_s)


@dataclass(frozen=True, slots=True)
class ChildRecord:
    """What the supervisor remembers of one child between its exits."""

    restarts: int = 0
    """Restarts so far (the count operators read)."""
    quick_exits: int = 0
    """Exits in a row that came before the run was stable."""


@dataclass(frozen=True, slots=True)
class RestartPlan:
    record: ChildRecord
    """The record once this restart is done."""
    delay_s: float


def after_exit(record: ChildRecord, uptime_s: float, backoff: Backoff) -> RestartPlan:
    """The restart that answers an exit after a run of `uptime_s` seconds."""
    quick_exits = 1 if uptime_s >= backoff.stable_after_s else record.quick_exits + 1
    return RestartPlan(ChildRecord(record.restarts + 1, quick_exits), backoff.delay(quick_exits))
