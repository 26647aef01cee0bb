"""BackgroundBatcher: a failing write is retried with backoff; only a batch that fails every
time is dropped, and its items reach the drop hook."""

from __future__ import annotations

import pytest

from control_plane.ledger.batching import BackgroundBatcher


class FlakySink:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.written: list[int] = []

    def __call__(self, batch: list[int]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(f"write {self.calls} failed")
        self.written.extend(batch)


def test_a_write_that_fails_then_succeeds_loses_nothing() -> None:
    sink = FlakySink(failures=2)
    drops: list[tuple[list[int], BaseException]] = []
    batcher = BackgroundBatcher(sink, name="t", interval_s=3600, retries=3, first_backoff_s=0,
                                on_drop=lambda batch, error: drops.append((batch, error)))
    for item in range(5):
        batcher.add(item)
    batcher.close()
    assert (sink.written, sink.calls, batcher.dropped, drops) == ([0, 1, 2, 3, 4], 3, 0, [])


def test_a_write_that_always_fails_is_dropped_after_the_retries() -> None:
    sink = FlakySink(failures=100)
    drops: list[tuple[list[int], str]] = []
    batcher = BackgroundBatcher(sink, name="t", interval_s=3600, retries=2, first_backoff_s=0,
                                on_drop=lambda batch, error: drops.append((batch, str(error))))
    batcher.add(7)
    batcher.add(8)
    batcher.close()
    assert (sink.calls, batcher.dropped, drops) == (3, 2, [([7, 8], "write 3 failed")])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="retries"):
        BackgroundBatcher(FlakySink(0), name="t", retries=-1)
