"""`gpu-router up` as a service manager: children that exit are restarted, stop signals stop all.

Every exit, restart and readiness is one JSON line on stderr, for journald or any log shipper.
An edge (Envoy) keeps serving while ext_proc or the control plane is down, so nothing else is
restarted with them: Envoy fails open on ext_proc and keeps its last config.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from gpu_router.backoff import Backoff, ChildRecord, after_exit
from gpu_router.processes import ProcessError
from gpu_router.stack import Stack

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
TICK_S = 0.2


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stderr."""
    print(json.dumps({"ts": round(time.time(), 3), "event": event, **fields}), file=sys.stderr,
          flush=True)


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP, recorded. The handler only appends: it runs between two
    bytecodes of whatever the main thread does, so it must neither raise (a half-started
    child would be orphaned) nor write (a reentrant write to stderr raises). Signals after
    the first are recorded too and change nothing: a second Ctrl-C cannot cut the shutdown
    short."""

    def __init__(self) -> None:
        self.received: list[int] = []

    @classmethod
    def install(cls) -> StopSignals:
        signals = cls()
        for signum in STOP_SIGNALS:
            signal.signal(signum, signals._record)
        return signals

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)

    def requested(self) -> bool:
        return bool(self.received)

    def names(self) -> list[str]:
        return [signal.Signals(signum).name for signum in self.received]


class Supervisor:
    """Watches a started stack's children; respawns the ones that exit, with backoff."""

    def __init__(self, stack: Stack, signals: StopSignals, backoff: Backoff | None = None) -> None:
        self.stack, self.signals = stack, signals
        self.backoff = backoff or Backoff()
        self.records = {name: ChildRecord() for name in stack.processes}
        self.due: dict[str, float] = {}
        """Children waiting out their backoff: name -> time.monotonic() of the restart."""
        self.unready: dict[str, Callable[[], bool]] = {}
        """Respawned children not ready yet: name -> their readiness check."""

    def run(self) -> None:
        """Supervise until a stop signal; the caller then shuts the stack down."""
        emit("supervising", children={name: p.pid for name, p in self.stack.processes.items()})
        while not self.signals.requested():
            self.tick(time.monotonic())
            time.sleep(TICK_S)
        emit("stopping", signal=self.signals.names()[0], restarts=self.restarts())

    def tick(self, now: float) -> None:
        for name, process in self.stack.processes.items():
            if name in self.due:
                if now >= self.due[name]:
                    self._respawn(name, now)
            elif not process.alive():
                process.stop()  # its group's leftovers (ext_proc workers) would hold its port
                self._schedule(name, now, now - process.started_at, pid=process.pid,
                               returncode=process.returncode)
            elif name in self.unready and _passes(self.unready[name]):
                del self.unready[name]
                emit("child_ready", child=name, pid=process.pid,
                     restarts=self.records[name].restarts)

    def restarts(self) -> dict[str, int]:
        return {name: record.restarts for name, record in self.records.items()}

    def report_stopped(self, exits: dict[str, int | None]) -> None:
        """The final line: restarts per child, each child's exit status in stop order, and
        every stop signal received (those after the first changed nothing)."""
        emit("stopped", restarts=self.restarts(), exits=exits, signals=self.signals.names())

    def _schedule(self, name: str, now: float, uptime_s: float, **fields: Any) -> None:
        plan = after_exit(self.records[name], uptime_s, self.backoff)
        self.records[name] = plan.record
        self.due[name] = now + plan.delay_s
        self.unready.pop(name, None)
        emit("child_exited", child=name, **fields, uptime_s=round(uptime_s, 3),
             restarts=plan.record.restarts, backoff_s=plan.delay_s)

    def _respawn(self, name: str, now: float) -> None:
        del self.due[name]
        try:
            self.unready[name] = self.stack.respawn(name)
        except OSError as error:  # could not even exec: a run of no length
            self._schedule(name, now, 0.0, error=str(error))
            return
        emit("child_restarted", child=name, pid=self.stack.processes[name].pid,
             restarts=self.records[name].restarts)


def _passes(check: Callable[[], bool]) -> bool:
    """A readiness check that cannot reach what it asks (the control plane restarting) fails."""
    try:
        return check()
    except (OSError, ProcessError, ValueError):
        return False
