"""`gpu-router up` as a service: children that crash come back by themselves under load, and
SIGTERM, SIGHUP or SIGINT stop every process it started (ext_proc's workers too), exit 0.

Every process `up` starts, at any depth, inherits a tag in its environment: that is how the
tests find what is left, whatever its session, group or parent by then."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from polling import eventually
from stack_harness import CLI, CLIENTS, Traffic, chat, policy_on_free_ports

from control_plane.policy.load import default_policy_path
from control_plane.translate.fallback_routes import FALLBACK_REASON
from gpu_router.processes import free_port, port_open

TAG = "GPU_ROUTER_SERVICE_TEST"
MODEL = "llama-3.1-8b"
BATCH = {"x-workload": "batch"}


class Up:
    """One `gpu-router up` on free ports, its JSON lines (stderr) read from a file."""

    def __init__(self, directory: Path, workers: int = 2) -> None:
        self.directory = directory
        self.policy = policy_on_free_ports(default_policy_path(), directory / "policy.yaml")
        self.ports = {name: free_port() for name in ("edge", "admin", "xds", "ext-proc", "http")}
        self.ledger = directory / "ledger.db"
        self.argv = [
            *CLI, "up", "--policy", str(self.policy), "--log-dir", str(directory / "logs"),
            "--workers", str(workers), "--ledger", str(self.ledger),
            "--audit-log", str(directory / "audit.jsonl"),
            *(arg for name, port in self.ports.items() for arg in (f"--{name}-port", str(port))),
        ]  # fmt: skip
        self.stdout, self.stderr = directory / "up.out", directory / "up.err"
        self.tag = f"{TAG}={uuid.uuid4()}".encode()
        self.popen: subprocess.Popen[bytes] | None = None
        self.chats = 0
        """Requests this test sent through the edge besides its Traffic."""

    def launch(self) -> Up:
        name, _, value = self.tag.decode().partition("=")
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=err,
                                          env={**os.environ, name: value})
        return self

    def start(self) -> Up:
        self.launch()
        eventually(self.started, "gpu-router up to print its endpoint", timeout=120)
        return self

    def started(self) -> bool:
        """Up, and supervising: its line comes after the endpoint's, on the other stream."""
        assert self.popen is not None and self.popen.poll() is None, self.stderr.read_text()
        return "Ctrl-C" in self.stdout.read_text() and bool(self.events("supervising"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['edge']}"

    def events(self, event: str, **match: Any) -> list[dict[str, Any]]:
        """Its JSON lines of kind `event` whose fields include `match`."""
        lines = (json.loads(line) for line in self.stderr.read_text().splitlines()
                 if line.startswith("{"))
        return [e for e in lines if e["event"] == event and match.items() <= e.items()]

    def pid_of(self, child: str) -> int:
        """The pid `child` runs as now, as the JSON lines tell."""
        restarted = self.events("child_restarted", child=child)
        if restarted:
            return restarted[-1]["pid"]
        return self.events("supervising")[0]["children"][child]

    def chat(self) -> tuple[int, dict[str, str]]:
        self.chats += 1
        status, headers, _ = chat(self, MODEL, BATCH)
        return status, headers

    def processes(self) -> dict[int, str]:
        """Its living processes (zombies are dead), itself included: pid -> command name."""
        found = {}
        for entry in Path("/proc").iterdir():
            try:
                if self.tag not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                stat = (entry / "stat").read_text()
            except (OSError, ValueError):  # not a process, gone, or not ours to read
                continue
            command, _, rest = stat.partition(" (")[2].rpartition(") ")
            if not rest.startswith("Z"):
                found[int(entry.name)] = command
        return found

    def signal(self, signum: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(signum)

    def stop(self) -> None:
        """Kill it and all it started, whatever state a failed test left them in."""
        if self.popen is None:
            return
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait()


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    running = Up(tmp_path).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_stops_every_child_and_exits_0(up: Up, signum: int) -> None:
    [supervising] = up.events("supervising")
    children = set(supervising["children"].values())
    running = up.processes()
    assert children < set(running), running
    assert len(running) >= 1 + len(children) + 2, running  # itself, ext_proc's two workers

    up.signal(signum)
    eventually(lambda: up.events("stopping"), "the stopping line")
    up.signal(signum)  # a second signal during the shutdown must not cut it short

    assert up.popen is not None and up.popen.wait(timeout=60) == 0, up.stderr.read_text()
    assert up.processes() == {}
    assert not [port for port in up.ports.values() if port_open(port)]
    [stopped] = up.events("stopped")
    assert stopped["signals"] == [signal.Signals(signum).name] * 2
    assert set(stopped["restarts"].values()) == {0}
    # Envoy last (it serves while the others stop), then the providers its last requests need;
    # every one stopped by its SIGTERM, none needed the SIGKILL.
    assert list(stopped["exits"].items()) == [
        ("ext-proc-1", 0), ("control-plane", 0), ("edge-1", 0), ("simulator", 0)]


def test_a_stop_signal_while_it_starts_stops_what_it_started(tmp_path: Path) -> None:
    up = Up(tmp_path).launch()
    try:
        eventually(lambda: len(up.processes()) > 1, "its first child to start")

        up.signal(signal.SIGTERM)

        assert up.popen is not None and up.popen.wait(timeout=60) == 0, up.stderr.read_text()
        assert "stopped by SIGTERM while starting" in up.stderr.read_text()
        assert "Ctrl-C" not in up.stdout.read_text()
        assert up.processes() == {}
    finally:
        up.stop()


def served(traffic: Traffic) -> int:
    with traffic.lock:
        return sum(n for (status, _), n in traffic.outcomes.items() if status == 200)


def ledger_rows(path: Path) -> int:
    """Rows of requests a provider served (the stack's readiness probes list models: none).
    Not by model: a request routed by the fallback route has none in the ledger."""
    if not path.exists():
        return 0
    with sqlite3.connect(path) as connection:
        query = "select count(*) from requests where provider != ''"
        return connection.execute(query).fetchone()[0]


def routed_by_ext_proc(up: Up) -> bool:
    status, headers = up.chat()
    return status == 200 and headers.get("x-gpu-router-reason", "") not in ("", FALLBACK_REASON)


def sent(up: Up, traffic: Traffic) -> int:
    """Requests served through the edge so far: the traffic's and the test's own."""
    return served(traffic) + up.chats


def crash_and_recover(up: Up, traffic: Traffic, child: str) -> None:
    """SIGKILL `child`'s process group; wait until the supervisor brought it back and the
    edge routes through ext_proc again, with requests served all along."""
    pid = up.pid_of(child)
    os.killpg(pid, signal.SIGKILL)
    [exited] = eventually(lambda: up.events("child_exited", child=child, pid=pid),
                          f"{child}'s exit line")
    assert exited["returncode"] == -signal.SIGKILL and exited["restarts"] == 1
    assert exited["backoff_s"] == 0.5
    [restarted] = eventually(lambda: up.events("child_restarted", child=child),
                             f"{child} restarted")
    assert restarted["pid"] != pid
    eventually(lambda: up.events("child_ready", child=child, pid=restarted["pid"]),
               f"{child} ready again", timeout=60)
    before = served(traffic)
    eventually(lambda: served(traffic) > before + CLIENTS, "more requests through the edge")
    eventually(lambda: routed_by_ext_proc(up), "the edge to route through ext_proc again")


def test_crashed_ext_proc_and_control_plane_come_back_under_load(up: Up) -> None:
    assert routed_by_ext_proc(up)

    with Traffic(up, MODEL, BATCH, threads=CLIENTS) as traffic:
        eventually(lambda: served(traffic) > CLIENTS, "requests to flow")
        crash_and_recover(up, traffic, "ext-proc-1")
        crash_and_recover(up, traffic, "control-plane")

    assert traffic.failures() == {}, traffic.failed
    assert {e["child"] for e in up.events("child_exited")} == {"ext-proc-1", "control-plane"}
    total = sent(up, traffic)
    # Rows of requests served while the control plane was down come from the edge's durable
    # request log, which the restarted control plane reconciles every few seconds.
    eventually(lambda: ledger_rows(up.ledger) >= total, f"all {total} requests in the ledger")
    assert ledger_rows(up.ledger) == total

    up.signal(signal.SIGTERM)
    assert up.popen is not None and up.popen.wait(timeout=60) == 0
    [stopped] = up.events("stopped")
    assert stopped["restarts"] == {"simulator": 0, "control-plane": 1, "ext-proc-1": 1, "edge-1": 0}
