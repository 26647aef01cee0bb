"""The stack's child processes: port picking, stopping a whole process group, giving up a wait."""

import socket
from pathlib import Path

import pytest
from polling import eventually

from gpu_router import processes


def test_free_ports_are_outside_the_ephemeral_range_and_never_repeat() -> None:
    ephemeral = processes._ephemeral_range()
    ports = [processes.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert not [port for port in ports if port in ephemeral]


def test_a_port_in_use_is_never_handed_out(monkeypatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        monkeypatch.setattr(processes, "_ephemeral_range", lambda: range(0))
        real_randrange = processes.random.randrange
        offered = [busy, busy]
        monkeypatch.setattr(processes.random, "randrange",
                            lambda low, high: offered.pop() if offered else real_randrange(low, high))
        assert processes.free_port() != busy
        assert not offered


def group_members(pgid: int) -> list[int]:
    """Living (not zombie) processes of process group `pgid`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rpartition(") ")[2].split()[:3]
        except OSError:
            continue
        if int(pgrp) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def test_stop_kills_what_an_exited_leader_left_in_its_group(tmp_path: Path) -> None:
    """A crashed ext_proc leaves its workers holding its port: stop() ends them too."""
    child = processes.ManagedProcess(
        "orphaner", ["sh", "-c", "sleep 300 & echo started; exit 3"], tmp_path / "o.log"
    ).start()
    eventually(lambda: child.returncode is not None, "the leader to exit")
    assert child.returncode == 3
    assert len(group_members(child.pid)) == 1, "its sleep outlived it"

    child.stop()

    assert group_members(child.pid) == []


def test_waiting_for_a_child_gives_up_once_cancelled(tmp_path: Path) -> None:
    child = processes.ManagedProcess("sleeper", ["sleep", "300"], tmp_path / "s.log").start()
    try:
        with pytest.raises(processes.Cancelled, match="sleeper: stopped waiting for never"):
            child.wait_until(lambda: False, "never", timeout=60, cancelled=lambda: True)
        assert child.alive(), "the caller stops it, not the wait"
    finally:
        child.stop()
    assert not child.alive() and group_members(child.pid) == []


class _Unstoppable(processes.ManagedProcess):
    def stop(self) -> None:
        raise OSError("no such process group")


def test_one_process_that_cannot_be_stopped_does_not_keep_the_others_running(
        tmp_path: Path) -> None:
    sleepers = {name: processes.ManagedProcess(name, ["sleep", "300"], tmp_path / f"{name}.log")
                for name in ("first", "last")}
    running = {"first": sleepers["first"], "stuck": _Unstoppable("stuck", ["true"], tmp_path / "x"),
               "last": sleepers["last"]}
    for sleeper in sleepers.values():
        sleeper.start()

    exits, errors = processes.stop_each(running, ["first", "stuck", "last"])

    assert exits == {"first": -15, "last": -15}  # SIGTERM ended both
    assert [str(error) for error in errors] == ["no such process group"]
    assert not any(sleeper.alive() for sleeper in sleepers.values())
