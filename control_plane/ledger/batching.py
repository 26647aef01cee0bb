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
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)


class BatcherClosedError(RuntimeError):
    """add() after close(): the item would never be written."""


class BackgroundBatcher(Generic[T]):
    def __init__(self, sink: Callable[[list[T]], None], *, name: str, interval_s: float = 0.5,
                 max_batch: int = 200) -> None:
        if interval_s <= 0 or max_batch < 1:
            raise ValueError(f"need interval_s > 0 and max_batch >= 1, got {interval_s}, "
                             f"{max_batch}")
        self._sink = sink
        self._name = name
        self._interval_s = interval_s
        self._max_batch = max_batch
        self._pending: list[T] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self.dropped = 0
        """Items lost because the sink raised (each failure is logged)."""
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
        try:
            self._sink(batch)
        except Exception:
            self.dropped += len(batch)
            logger.exception("%s: dropped a batch of %d", self._name, len(batch))
