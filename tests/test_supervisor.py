"""The supervisor's shell over a stand-in stack: what it does and says when a child exits, and
the stop signals it records (real signals, sent to this process)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from gpu_router.backoff import Backoff
from gpu_router.supervisor import STOP_SIGNALS, StopSignals, Supervisor


@dataclass
class Child:
    pid: int
    started_at: float = 0.0
    returncode: int | None = None
    stops: int = 0

    def alive(self) -> bool:
        return self.returncode is None

    def stop(self) -> None:
        self.stops += 1


@dataclass
class FakeStack:
    processes: dict[str, Child]
    ready: bool = False
    respawned: list[str] = field(default_factory=list)

    def respawn(self, name: str) -> Any:
        self.respawned.append(name)
        child = self.processes[name]
        child.pid, child.returncode = child.pid + 100, None
        return lambda: self.ready


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


@pytest.fixture
def stack() -> FakeStack:
    return FakeStack({"control-plane": Child(10), "ext-proc-1": Child(20), "edge-1": Child(30)})


def supervisor(stack: FakeStack) -> Supervisor:
    backoff = Backoff(initial_s=0.5, maximum_s=30.0, stable_after_s=60.0)
    return Supervisor(stack, StopSignals(), backoff)  # type: ignore[arg-type]


def test_an_exited_child_is_restarted_alone_after_its_backoff(
    stack: FakeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    watcher = supervisor(stack)
    stack.processes["ext-proc-1"].returncode = -9
    watcher.tick(now=5.0)
    [exited] = lines(capsys)
    assert exited | {"ts": 0} == {"ts": 0, "event": "child_exited", "child": "ext-proc-1",
                                  "pid": 20, "returncode": -9, "uptime_s": 5.0, "restarts": 1,
                                  "backoff_s": 0.5}
    assert stack.processes["ext-proc-1"].stops == 1, "what is left of its group is killed"

    watcher.tick(now=5.4)
    assert stack.respawned == [] and lines(capsys) == []
    watcher.tick(now=5.5)
    assert stack.respawned == ["ext-proc-1"]
    [restarted] = lines(capsys)
    assert (restarted["event"], restarted["pid"], restarted["restarts"]) == ("child_restarted", 120, 1)

    watcher.tick(now=5.7)
    assert lines(capsys) == [], "not ready yet"
    stack.ready = True
    watcher.tick(now=5.9)
    [ready] = lines(capsys)
    assert (ready["event"], ready["child"], ready["pid"]) == ("child_ready", "ext-proc-1", 120)
    assert watcher.restarts() == {"control-plane": 0, "ext-proc-1": 1, "edge-1": 0}


def test_a_child_that_exits_again_at_once_waits_twice_as_long(
    stack: FakeStack, capsys: pytest.CaptureFixture[str]
) -> None:
    watcher = supervisor(stack)
    child = stack.processes["control-plane"]
    child.returncode = 1
    watcher.tick(now=100.0)
    watcher.tick(now=100.5)
    child.started_at, child.returncode = 100.5, 1
    watcher.tick(now=101.0)
    backoffs = [line["backoff_s"] for line in lines(capsys) if line["event"] == "child_exited"]
    assert backoffs == [0.5, 1.0]
    watcher.tick(now=101.9)
    assert stack.respawned == ["control-plane"]
    watcher.tick(now=102.0)
    assert stack.respawned == ["control-plane"] * 2


@pytest.fixture
def restored_handlers() -> Iterator[None]:
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_stop_signals_are_recorded_in_order_and_never_raise(restored_handlers: None) -> None:
    signals = StopSignals.install()
    assert not signals.requested()
    os.kill(os.getpid(), signal.SIGHUP)
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the shutdown goes on
    assert signals.requested()
    assert signals.names() == ["SIGHUP", "SIGINT"]
