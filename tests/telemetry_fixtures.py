"""What the telemetry tests share: samples, a settable clock, polling from a coroutine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc

from control_plane.telemetry.samples import RequestSample
from control_plane.xds.peer import Admit, Peer
from gpu_router.pki import Role

T0 = 1_700_000_000_000
"""A fixed Unix-ms instant: health is judged on the times passed in, never on the wall clock."""


def sample(
    at_ms: int,
    status: int = 200,
    *,
    provider: str = "prov-a",
    model: str = "m1",
    total_ms: float = 100.0,
    ttfb_ms: float = 20.0,
    upstream_failure: bool = False,
    retry_after_s: float | None = None,
    policy: str = "p",
    reason: str = "r",
    request_id: str = "",
) -> RequestSample:
    return RequestSample(
        provider=provider,
        model=model,
        status=status,
        ttfb_ms=ttfb_ms,
        total_ms=total_ms,
        at_unix_ms=at_ms,
        upstream_failure=upstream_failure,
        policy=policy,
        reason=reason,
        node="edge-1",
        retry_after_s=retry_after_s,
        request_id=request_id,
    )


class FakeClock:
    """A `clock` argument (seconds, like time.time) that moves only when a test sets it."""

    def __init__(self, unix_ms: int) -> None:
        self.unix_ms = unix_ms

    def __call__(self) -> float:
        return self.unix_ms / 1000.0


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 5.0,
                     interval_s: float = 0.005) -> None:
    """Yield to the event loop until `condition` holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval_s)


def edge_named(node_id: str) -> Admit:
    """Admits every peer as the edge whose certificate names `node_id`: for plaintext test
    servers only (the control plane admits edge certificates only, test_security.py)."""

    async def admit(context: grpc.aio.ServicerContext, _asked: str) -> Peer:
        return Peer(context.peer(), Role.EDGE, node_id)

    return admit
