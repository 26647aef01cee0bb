"""Hands items to a slow sink (SQLite, a file) in batches, off the caller's thread.

`add` only appends to a list under a lock that the writer thread holds just long
enough to swap the list out, so the asyncio event loop that calls it never waits
on I/O. The writer thread writes a batch as soon as `max_batch` items are pending,
and whatever is pending when `interval_s` passes without a full batch; a batch
is at most `max_batch` items (one transaction for the ledger).

What a crash loses: the items added since the last batch the sink finished,
i.e. at most `interval_s` worth of items or `max_batch` items, whichever comes
first (plus whatever piles up while a slow sink is still writing the previous
batch). `close()` writes everything before it returns.

A batch whose write raises is tried again, `retries` more times with doubling backoff
(a locked or briefly full disk recovers); only then is it dropped: counted in `dropped`,
handed to `on_drop` (for the metrics) and logged as one JSON line with the count and the error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)

RETRIES = 3
FIRST_BACKOFF_S = 0.1

DropHook = Callable[[list[T], BaseException], None]
"""Called with the items of a finally failed batch and the last error."""


class BatcherClosedError(RuntimeError):
    """add() after close(): the item would never be written."""


class BackgroundBatcher(Generic[T]):
    def __init__(self, sink: Callable[[list[T]], None], *, name: str, interval_s: float = 0.5,
                 max_batch: int = 200, retries: int = RETRIES,
                 first_backoff_s: float = FIRST_BACKOFF_S,
                 on_drop: DropHook[T] | None = None) -> None:
        if interval_s <= 0 or max_batch < 1 or retries < 0 or first_backoff_s < 0:
            raise ValueError(f"need interval_s > 0, max_batch >= 1, retries >= 0 and "
                             f"first_backoff_s >= 0, got {interval_s}, {max_batch}, {retries}, "
                             f"{first_backoff_s}")
        self._sink = sink
        self._name = name
        self._interval_s = interval_s
        self._max_batch = max_batch
        self._retries = retries
        self._first_backoff_s = first_backoff_s
        self._on_drop = on_drop
        self._pending: list[T] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self.dropped = 0
        """Items lost because the sink kept raising (each drop is logged)."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, item: T) -> None:
        """O(1); never waits for I/O."""
        with self._lock:
            if self._closed:
                raise BatcherClosedError(f"{self._name} is closed")
            self._pending.append(item)
            full = len(self._pending) >= self._max_batch
        if full:
            self._wake.set()

    def close(self) -> None:
        """Write everything added so far, then stop the writer thread."""
        with self._lock:
            self._closed = True
        self._wake.set()
        self._thread.join()

    def _take(self, *, everything: bool) -> tuple[list[T], bool]:
        """The next batch (at most max_batch items): only a full one unless `everything`
        (the timer fired) or the batcher is closing; and whether it is closing."""
        with self._lock:
            closed = self._closed
            pending = len(self._pending)
            size = min(pending, self._max_batch) if everything or closed else (
                self._max_batch if pending >= self._max_batch else 0)
            batch = self._pending[:size]
            del self._pending[:size]
            return batch, closed

    def _run(self) -> None:
        while True:
            timer_fired = not self._wake.wait(self._interval_s)
            self._wake.clear()
            while True:
                batch, closed = self._take(everything=timer_fired)
                if not batch:
                    break
                self._write(batch)
            if closed:
                return

    def _write(self, batch: list[T]) -> None:
        backoff_s = self._first_backoff_s
        for attempt in range(self._retries + 1):
            try:
                self._sink(batch)
                return
            except Exception as error:  # noqa: BLE001 - any sink failure is retried, then counted
                last = error
                if attempt < self._retries:
                    logger.warning("batch write failed, retrying", extra={
                        "batcher": self._name, "count": len(batch), "attempt": attempt + 1,
                        "error": repr(error)})
                    time.sleep(backoff_s)
                    backoff_s *= 2
        self.dropped += len(batch)
        logger.error("batch dropped", extra={
            "batcher": self._name, "count": len(batch), "attempts": self._retries + 1,
            "error": repr(last)})
        if self._on_drop is not None:
            self._on_drop(batch, last)
