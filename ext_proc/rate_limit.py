"""Per-client requests and tokens per minute: a sliding-window counter, fleet-wide through Redis.

Each limit keeps one counter per client and minute. A request is admitted when
    previous minute's count x (share of the previous minute still in the window) + this minute's
stays within the limit, the usual sliding-window estimate: no burst of twice the limit at a
minute boundary, and two integers per client and limit. A refused request gives its count
back, so refusals do not eat into the next minute.

Where the counters live decides how far a limit holds:
- RedisCounters (`--redis URL`): every ext_proc worker of every replica behind every edge
  shares them; one pipelined round trip per limited request (INCRBY, EXPIRE, GET), on one of
  POOL_CONNECTIONS connections the worker opens at start. If Redis
  cannot be reached the limit fails open (the request passes, a warning is logged once per
  outage and worker, and once when it ends; one request tries Redis again every
  RETRY_REDIS_S, the others pass without waiting): budgets stay enforced, as they come from
  the control plane, not from Redis.
- LocalCounters (the default, no Redis): in this worker process only. Exact with one ext_proc
  worker behind one edge; with N workers (or replicas) a client gets up to N times its limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gpu_router.pki import TlsFiles
from gpu_router.redis_client import connection_pool

WINDOW_S = 60
RETRY_REDIS_S = 1.0
REDIS_TIMEOUT_S = 0.05
"""Per round trip: well inside Envoy's 200 ms wait for ext_proc's answer."""
POOL_CONNECTIONS = 4
"""Redis connections per worker, opened at start (RedisCounters.warm). A limited request waits
for a free one (each is held for one round trip) instead of opening its own: a burst of 64 new
TLS connections at once took longer than REDIS_TIMEOUT_S and failed every limit open."""
CONNECT_TIMEOUT_S = 1.0
"""How long any of the pool's connections may take to connect; only the ones opened at start
(RedisCounters.warm) can use all of it, since a request's round trip, a connect in it included,
stays bounded by REDIS_TIMEOUT_S (asyncio.wait_for in add and give_back). On a loaded 2-core
machine a TLS connect (its name lookup in a thread) took over REDIS_TIMEOUT_S and warm opened
none (found by CI)."""
_KEY_TTL_S = 2 * WINDOW_S + 5
KEY_PREFIX = "gpu-router:rl:"
"""Every counter's key starts with it: all Redis lets a replica's user touch."""
COMMANDS = ("incrby", "decrby", "expire", "get")
"""What RedisCounters sends: all Redis lets a replica's user run, with PING (redis_service)."""

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Charge:
    """`cost` units against `limit` per minute on counter `counter` (e.g. "search:req")."""

    counter: str
    cost: int
    limit: int


def retry_after_s(previous: int, current: int, limit: int, elapsed_s: float) -> float | None:
    """None when admitted (`current` already includes this request), else the seconds until the
    same request would be: the previous minute's weight decaying, or the next minute."""
    weight = 1.0 - elapsed_s / WINDOW_S
    if previous * weight + current <= limit:
        return None
    if current > limit or previous == 0:
        return WINDOW_S - elapsed_s
    # previous * (1 - t / WINDOW_S) + current <= limit  =>  t >= WINDOW_S * (1 - (limit - current) / previous)
    return max(WINDOW_S * (1.0 - (limit - current) / previous) - elapsed_s, 0.001)


class Counters(Protocol):
    async def add(self, window: int, charges: Sequence[Charge]) -> list[tuple[int, int]] | None:
        """Add each charge to its counter for minute `window`; (previous, current) per charge,
        or None when the counters cannot be reached (the limit fails open)."""

    async def give_back(self, window: int, charges: Sequence[Charge]) -> None:
        """Undo `add` for a refused request."""


class LocalCounters:
    """Counters in this process (see the module docstring for what that means with workers)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], int] = {}
        self._window = 0

    async def add(self, window: int, charges: Sequence[Charge]) -> list[tuple[int, int]] | None:
        if window != self._window:
            self._counts = {k: v for k, v in self._counts.items() if k[1] >= window - 1}
            self._window = window
        out = []
        for charge in charges:
            key = (charge.counter, window)
            current = self._counts[key] = self._counts.get(key, 0) + charge.cost
            out.append((self._counts.get((charge.counter, window - 1), 0), current))
        return out

    async def give_back(self, window: int, charges: Sequence[Charge]) -> None:
        for charge in charges:
            key = (charge.counter, window)
            self._counts[key] = self._counts.get(key, 0) - charge.cost


class RedisCounters:
    """Counters shared by the fleet in Redis (keys gpu-router:rl:<counter>:<minute>)."""

    def __init__(self, url: str, clock: Callable[[], float] = time.monotonic, *,
                 user: str | None = None, password: str | None = None,
                 tls: TlsFiles | None = None) -> None:
        """`user`: the replica's Redis user (None: Redis's default user)."""
        import redis.asyncio as redis  # only replicas given --redis need the client

        self._errors = (redis.RedisError, OSError, asyncio.TimeoutError)
        self._redis = redis.Redis(connection_pool=connection_pool(
            url, user=user, password=password, tls=tls, timeout_s=REDIS_TIMEOUT_S,
            max_connections=POOL_CONNECTIONS, connect_timeout_s=CONNECT_TIMEOUT_S))
        self._clock = clock
        self._down_until = 0.0
        self._failing = False
        """Since the last failed round trip: one warning per outage, one when it ends."""
        self.url = url

    async def warm(self) -> None:
        """Open the pool's connections before the first limited request needs one; a Redis
        out of reach, or refusing this user, is logged (the limits fail open), not an error."""
        pool = self._redis.connection_pool
        held = []
        try:
            for _ in range(POOL_CONNECTIONS):  # held at once: each is a connection of its own
                held.append(await pool.get_connection())
        except self._errors as error:
            _log.warning("rate-limit store not usable at start: limits fail open",
                         extra={"redis": self.url, "error": f"{type(error).__name__}: {error}"})
        finally:
            for connection in held:
                await pool.release(connection)

    @staticmethod
    def _key(counter: str, window: int) -> str:
        return f"{KEY_PREFIX}{counter}:{window}"

    async def add(self, window: int, charges: Sequence[Charge]) -> list[tuple[int, int]] | None:
        now = self._clock()
        if now < self._down_until:
            return None
        if self._failing:  # one request a retry asks whether the outage ended; the rest pass
            self._down_until = now + RETRY_REDIS_S
        pipe = self._redis.pipeline(transaction=False)
        for charge in charges:
            current = self._key(charge.counter, window)
            pipe.incrby(current, charge.cost)
            pipe.expire(current, _KEY_TTL_S)
            pipe.get(self._key(charge.counter, window - 1))
        try:
            replies = await asyncio.wait_for(pipe.execute(), REDIS_TIMEOUT_S)
        except self._errors as error:
            self._failed(error)
            return None
        if self._failing:
            self._failing, self._down_until = False, 0.0
            _log.warning("rate-limit store reachable again: limits counted",
                         extra={"redis": self.url})
        return [(int(replies[i + 2] or 0), int(replies[i])) for i in range(0, len(replies), 3)]

    async def give_back(self, window: int, charges: Sequence[Charge]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for charge in charges:
            pipe.decrby(self._key(charge.counter, window), charge.cost)
        try:
            await asyncio.wait_for(pipe.execute(), REDIS_TIMEOUT_S)
        except self._errors as error:
            self._failed(error)

    def _failed(self, error: BaseException) -> None:
        if not self._failing:
            self._failing = True
            _log.warning("rate-limit store unreachable: limits fail open",
                         extra={"redis": self.url, "error": f"{type(error).__name__}: {error}",
                                "retry_in_s": RETRY_REDIS_S})
        self._down_until = self._clock() + RETRY_REDIS_S

    async def close(self) -> None:
        await self._redis.aclose()


class RateLimiter:
    """Admits or refuses one request's charges; pure arithmetic around the counters."""

    def __init__(self, counters: Counters, clock: Callable[[], float] = time.time) -> None:
        self.counters = counters
        self._clock = clock

    async def retry_after(self, charges: Sequence[Charge]) -> float | None:
        """None when every charge fits its limit (and is counted); else seconds to wait
        (nothing counted)."""
        now = self._clock()
        window = int(now // WINDOW_S)
        counts = await self.counters.add(window, charges)
        if counts is None:
            return None
        elapsed = now - window * WINDOW_S
        waits = [retry_after_s(previous, current, charge.limit, elapsed)
                 for charge, (previous, current) in zip(charges, counts, strict=True)]
        refused = [wait for wait in waits if wait is not None]
        if not refused:
            return None
        await self.counters.give_back(window, charges)
        return max(refused)


def whole_seconds(wait_s: float) -> int:
    """Retry-After's value: whole seconds, at least 1."""
    return max(1, math.ceil(wait_s))
