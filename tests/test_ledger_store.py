"""The SQLite usage ledger: rows round-trip; batches flush on size, on time and on close;
a crash loses only rows added since the last committed batch."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from usage_fixtures import make_record

from control_plane.ledger.batching import BatcherClosedError
from control_plane.ledger.store import (
    LedgerRow,
    LedgerWriter,
    default_ledger_path,
    ledger_row,
    open_ledger,
    read_rows,
)
from control_plane.usage.normalise import normalise

DEADLINE_S = 10.0


def row(index: int = 0) -> LedgerRow:
    record = make_record(request_id=f"req-{index}", at_unix_ms=1_700_000_000_000 + index,
                         usage_text='"usage":{"prompt_tokens":10,"completion_tokens":4,'
                                    '"prompt_tokens_details":{"cached_tokens":6}}')
    return ledger_row(record, normalise(record), cost_usd=0.001 * index)


def count(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        return int(connection.execute("SELECT count(*) FROM requests").fetchone()[0])


def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_row_round_trips_with_reported_and_normalised_tokens(tmp_path: Path) -> None:
    writer = LedgerWriter(tmp_path / "ledger.db")
    writer.add(row(3))
    writer.close()
    with open_ledger(tmp_path / "ledger.db") as connection:
        (stored,) = read_rows(connection)
    assert stored == row(3)
    assert stored.reported_tokens == ('{"completion_tokens":4,"prompt_tokens":10,'
                                      '"prompt_tokens_details.cached_tokens":6}')
    assert (stored.input_tokens, stored.cached_input_tokens, stored.output_tokens) == (4, 6, 4)
    assert stored.estimated is False and stored.stream is False


def test_wal_mode_and_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "ledger.db"
    with open_ledger(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_default_path_follows_xdg_data_home(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_ledger_path() == tmp_path / "gpu-router" / "ledger.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_ledger_path() == Path.home() / ".local/share/gpu-router/ledger.db"


def test_a_full_batch_flushes_without_waiting_for_the_timer(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    writer = LedgerWriter(path, flush_interval_s=3600, max_batch=200)
    try:
        for index in range(250):
            writer.add(row(index))
        wait_until(lambda: count(path) == 200, "the first 200 rows")
        assert count(path) == 200, "the 50 rows of an unfilled batch wait for the timer"
    finally:
        writer.close()
    assert count(path) == 250, "close() flushes the rest"


def test_the_timer_flushes_a_partial_batch(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    writer = LedgerWriter(path, flush_interval_s=0.05, max_batch=200)
    try:
        for index in range(3):
            writer.add(row(index))
        wait_until(lambda: count(path) == 3, "3 rows flushed by the timer")
    finally:
        writer.close()


def test_add_after_close_is_refused(tmp_path: Path) -> None:
    writer = LedgerWriter(tmp_path / "ledger.db")
    writer.close()
    with pytest.raises(BatcherClosedError):
        writer.add(row())


def test_a_crash_loses_only_the_rows_not_yet_flushed(tmp_path: Path) -> None:
    """A process killed with os._exit keeps every committed batch and loses the rest."""
    path = tmp_path / "ledger.db"
    script = textwrap.dedent(f"""
        import os, sqlite3, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_ledger_store import count, row, wait_until
        from control_plane.ledger.store import LedgerWriter
        writer = LedgerWriter({str(path)!r}, flush_interval_s=3600, max_batch=200)
        for index in range(207):
            writer.add(row(index))
        wait_until(lambda: count({str(path)!r}) == 200, "first batch")
        os._exit(9)
    """)
    result = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 9, result.stderr
    with open_ledger(path) as connection:
        rows = read_rows(connection)
    assert [r.request_id for r in rows] == [f"req-{i}" for i in range(200)]
