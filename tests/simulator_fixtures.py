"""Simulated providers in-process on a background event loop, called over real sockets."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gpu_router.processes import free_port
from simulator.profiles import SimProfile
from simulator.server import ProviderSim, SimSpec

FAST = SimProfile(ttfb_ms=0.0)
MODELS = ("org/model-a", "model-b")


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    """Lower-case names."""
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    port: int,
    method: str,
    path: str,
    body: object = None,
    *,
    headers: Mapping[str, str] | None = None,
    raw: bytes | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One request on a fresh connection; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            method, path, body=data, headers={"content-type": "application/json", **(headers or {})}
        )
        response = conn.getresponse()
        return Reply(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        conn.close()


def poll_until(ready: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Wait for an eventual state: poll `ready` until true, fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def set_fault(port: int, **fault: object) -> None:
    reply = call(port, "POST", "/_sim/fault", fault)
    assert reply.status == 200, reply.body


def stats(port: int) -> dict[str, Any]:
    return call(port, "GET", "/_sim/stats").json()


@contextmanager
def running_sims(*specs: SimSpec) -> Iterator[list[ProviderSim]]:
    """Start providers on an event loop in a daemon thread; stop them and the loop on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sims = [ProviderSim(spec) for spec in specs]
    started: list[ProviderSim] = []
    try:
        for sim in sims:
            asyncio.run_coroutine_threadsafe(sim.start(), loop).result(10)
            started.append(sim)
        yield sims
    finally:
        for sim in started:
            asyncio.run_coroutine_threadsafe(sim.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def fast_spec(
    name: str = "alpha",
    *,
    port: int = 0,
    health_check_path: str = "/health",
    profile: SimProfile = FAST,
) -> SimSpec:
    return SimSpec(
        name=name,
        port=port or free_port(),
        model_ids=MODELS,
        health_check_path=health_check_path,
        profile=profile,
    )
