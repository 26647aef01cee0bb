"""The SQLite usage ledger: rows round-trip; batches flush on size, on time and on close;
a crash loses only rows added since the last committed batch; one row per request (its start
time and id); old rows pruned; a batch that keeps failing is dropped, counted and logged."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from usage_fixtures import as_version_7, make_record

from control_plane.json_log import JsonLogFormatter
from control_plane.ledger.batching import RETRIES, BatcherClosedError
from control_plane.ledger.store import (
    LedgerRow,
    LedgerWriter,
    LogOffset,
    default_ledger_path,
    known_request_ids,
    ledger_row,
    open_ledger,
    read_offsets,
    read_rows,
)
from control_plane.usage.normalise import normalise

DEADLINE_S = 10.0


def row(index: int = 0) -> LedgerRow:
    record = make_record(request_id=f"req-{index}", at_unix_ms=1_700_000_000_000 + index,
                         usage_text='"usage":{"prompt_tokens":10,"completion_tokens":4,'
                                    '"prompt_tokens_details":{"cached_tokens":6}}')
    return ledger_row(record, normalise(record, "openai"), cost_usd=0.001 * index)


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


def test_a_request_id_is_booked_once_whichever_path_or_process_writes_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    for _ in range(2):  # two processes, one after the other
        writer = LedgerWriter(path)
        writer.add(row(1))
        writer.add(row(1))
        writer.add(row(2))
        writer.close()
    with open_ledger(path) as connection:
        assert sorted(r.request_id for r in read_rows(connection)) == ["req-1", "req-2"]


def test_a_version_1_ledger_keeps_the_first_row_of_a_repeated_request(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with sqlite3.connect(path) as old:
        old.execute("CREATE TABLE requests (id INTEGER PRIMARY KEY, request_id TEXT NOT NULL, "
                    "at_unix_ms INTEGER NOT NULL)")
        old.executemany("INSERT INTO requests (request_id, at_unix_ms) VALUES (?, ?)",
                        [("a", 1), ("a", 2), ("b", 3)])
        old.execute("PRAGMA user_version=1")
    with open_ledger(path) as connection:
        assert connection.execute("SELECT request_id, at_unix_ms FROM requests ORDER BY id"
                                  ).fetchall() == [("a", 1), ("b", 3)]
        with pytest.raises(sqlite3.IntegrityError):
            connection.execute("INSERT INTO requests (request_id, at_unix_ms) VALUES ('a', 1)")


def test_a_version_7_ledger_is_keyed_by_start_time_and_id_and_keeps_its_rows(
        tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    writer = LedgerWriter(path, clock=lambda: 1_700_000_000.0)
    for index in range(3):
        writer.add(row(index))
    writer.close()
    as_version_7(path)
    with open_ledger(path) as connection:
        indexes = {name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'requests'")}
        assert indexes == {"requests_at", "requests_client_at"}
        assert [r.request_id for r in read_rows(connection)] == ["req-0", "req-1", "req-2"]
        plan = connection.execute(
            "EXPLAIN QUERY PLAN SELECT 1 FROM requests WHERE at_unix_ms = ? AND request_id = ?",
            (1, "a")).fetchall()
        assert "USING COVERING INDEX requests_at (at_unix_ms=? AND request_id=?)" in plan[0][3]


def test_a_version_3_ledger_gets_the_client_request_id_column(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    columns = [c for c in LedgerRow.__dataclass_fields__ if c != "client_request_id"]
    with sqlite3.connect(path) as old:
        old.execute(f"CREATE TABLE requests (id INTEGER PRIMARY KEY, {', '.join(columns)})")
        old.execute(f"INSERT INTO requests ({', '.join(columns)}) VALUES "
                    f"({', '.join('?' * len(columns))})",
                    [getattr(row(1), c) for c in columns])
        old.execute("PRAGMA user_version=3")
    writer = LedgerWriter(path, clock=lambda: 1_700_000_000.0)  # the old row is not pruned
    writer.add(ledger_row(make_record(request_id="req-2", client_request_id="theirs"),
                          normalise(make_record(), "openai"), 0.0))
    writer.close()
    with open_ledger(path) as connection:
        assert sorted((r.request_id, r.client_request_id) for r in read_rows(connection)) == [
            ("req-1", ""), ("req-2", "theirs")]


def test_rows_older_than_the_retention_are_pruned(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    writer = LedgerWriter(path)
    for index in range(3):
        writer.add(row(index))  # at 1_700_000_000_000 + index ms
    writer.close()
    day_s = 86_400
    # 10 days later, a 10-day retention keeps rows from 1_700_000_000_001 ms on.
    LedgerWriter(path, retention_days=10, clock=lambda: 1_700_000_000.001 + 10 * day_s).close()
    with open_ledger(path) as connection:
        assert [r.request_id for r in read_rows(connection)] == ["req-1", "req-2"]
    LedgerWriter(path, retention_days=10, clock=lambda: 1_700_000_000 + 11 * day_s).close()
    assert count(path) == 0


def test_a_batch_that_keeps_failing_is_dropped_counted_and_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ledger.db"
    open_ledger(path).executescript(
        "CREATE TRIGGER full BEFORE INSERT ON requests BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    drops: list[tuple[int, str]] = []
    writer = LedgerWriter(path, on_drop=lambda rows, error: drops.append((rows, str(error))))
    writer.add(row(1))
    writer.add(row(2))
    writer.add_offset(LogOffset(path="/x", inode=1, offset=10))
    with caplog.at_level(logging.WARNING, logger="control_plane.ledger.batching"):
        writer.close()
    assert drops == [(2, "disk full")] and writer.dropped == 2
    retried = [r for r in caplog.records if r.getMessage() == "batch write failed, retrying"]
    (dropped,) = [r for r in caplog.records if r.getMessage() == "batch dropped"]
    assert len(retried) == RETRIES
    line = json.loads(JsonLogFormatter().format(dropped))
    assert (line["level"], line["count"], line["attempts"]) == ("error", 3, RETRIES + 1)
    assert "disk full" in line["error"]
    assert count(path) == 0


def test_reconciler_offsets_commit_with_the_rows(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    writer = LedgerWriter(path)
    writer.add(row(1))
    writer.add_offset(LogOffset(path="/logs/edge-1.access.jsonl", inode=7, offset=100))
    writer.add_offset(LogOffset(path="/logs/edge-1.access.jsonl", inode=7, offset=250))
    writer.close()
    with open_ledger(path) as connection:
        assert read_offsets(connection) == {"/logs/edge-1.access.jsonl": LogOffset(
            path="/logs/edge-1.access.jsonl", inode=7, offset=250)}
        at = row(1).at_unix_ms
        assert known_request_ids(connection, [(at, "req-1"), (at, "req-9")]) == {"req-1"}
        # The key is the pair: the same id at another start time is another request.
        assert known_request_ids(connection, [(at + 1, "req-1")]) == set()
