"""The ledger's hourly rollups: what the writer adds equals a rebuild from the rows (repeated
request ids counted once, pruning mid-hour), an old ledger is backfilled on open, and report and
savings read from them give the row-by-row figures (percentiles within the bucket error)."""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from usage_fixtures import make_record

from control_plane.ledger import rollup
from control_plane.ledger.report import build_report
from control_plane.ledger.savings import build_savings
from control_plane.ledger.store import LedgerWriter, ledger_row, open_ledger
from control_plane.policy.load import default_policy_path, load_policy_file
from control_plane.usage.normalise import normalise

NOW = datetime(2024, 5, 1, 12, 20, 17, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
HOUR_MS = rollup.HOUR_MS
PROVIDERS = ("lambda", "coreweave", "vast", "")
MODELS = ("llama-3.1-8b", "mixtral-8x7b")


def rows_of(count: int, seed: int) -> list:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        provider = rng.choice(PROVIDERS)
        record = make_record(
            request_id=f"r{seed}-{index}", at_unix_ms=NOW_MS - rng.randrange(30 * HOUR_MS),
            provider=provider, model=rng.choice(MODELS), total_ms=rng.uniform(5, 3000),
            status=404 if not provider else rng.choice((200, 200, 200, 429, 503)),
            attempts=rng.choice((1, 1, 2)))
        rows.append(ledger_row(record, normalise(record, "openai"), rng.uniform(0, 0.01)))
    return rows


def tables(connection: sqlite3.Connection) -> dict[str, list[tuple]]:
    return {name: [tuple(round(v, 9) if isinstance(v, float) else v for v in row)
                   for row in connection.execute(f"SELECT * FROM {name} ORDER BY 1, 2, 3, 4")]
            for name in ("requests_hourly", "latency_hourly")}


def test_the_writer_rolls_up_each_row_once_and_pruning_keeps_the_rollups_exact(
        tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    rows = rows_of(900, seed=1)
    writer = LedgerWriter(path, max_batch=64, retention_days=1,
                          clock=lambda: NOW_MS / 1000 - 86_400 + 5 * 3600)  # prunes nothing
    for row in rows + rows[::3]:  # a third of the request ids arrive twice
        writer.add(row)
    writer.close()
    connection = open_ledger(path)
    written = tables(connection)
    assert sum(r[4] for r in written["requests_hourly"]) == 900, "repeated ids counted once"
    with connection:
        rollup.rebuild(connection)
    assert tables(connection) == written
    connection.close()
    LedgerWriter(path, retention_days=1, clock=lambda: NOW_MS / 1000).close()  # prunes mid-hour
    connection = open_ledger(path)
    kept = connection.execute("SELECT count(*) FROM requests").fetchone()[0]
    assert 0 < kept < 900
    pruned = tables(connection)
    assert sum(r[4] for r in pruned["requests_hourly"]) == kept
    with connection:
        rollup.rebuild(connection)
    assert tables(connection) == pruned


def test_a_ledger_from_before_rollups_is_backfilled_on_open(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    writer = LedgerWriter(path)
    for row in rows_of(200, seed=2):
        writer.add(row)
    writer.close()
    with sqlite3.connect(path) as old:
        old.execute("DROP TABLE requests_hourly")
        old.execute("DROP TABLE latency_hourly")
        old.execute("PRAGMA user_version=5")
    connection = open_ledger(path)
    assert connection.execute("SELECT total(requests) FROM requests_hourly").fetchone()[0] == 200
    assert connection.execute("SELECT total(requests) FROM latency_hourly").fetchone()[0] == 200


@pytest.mark.parametrize("window", [timedelta(hours=3), timedelta(days=2)])
def test_report_and_savings_from_the_rollups_match_the_rows(tmp_path: Path,
                                                             window: timedelta) -> None:
    path = tmp_path / "ledger.db"
    writer = LedgerWriter(path, max_batch=50)
    for row in rows_of(3000, seed=3):
        writer.add(row)
    writer.close()
    exact = build_report(path, window, NOW)  # NOW is mid-hour: a partial first hour
    rolled = build_report(path, window, NOW, exact_rows=0)
    assert [s.provider for s in rolled.providers] == [s.provider for s in exact.providers]
    for mine, theirs in zip((*rolled.providers, rolled.total), (*exact.providers, exact.total),
                            strict=True):
        assert (mine.requests, mine.estimated) == (theirs.requests, theirs.estimated)
        assert mine.spend_usd == pytest.approx(theirs.spend_usd)
        assert (mine.error_rate, mine.rate_429) == (theirs.error_rate, theirs.rate_429)
        for bucketed, value in ((mine.p50_ms, theirs.p50_ms), (mine.p99_ms, theirs.p99_ms)):
            assert bucketed == pytest.approx(value, rel=rollup.BUCKET_ERROR)
    assert rolled.unrouted == exact.unrouted
    config = load_policy_file(default_policy_path())
    savings = build_savings(path, config, window, NOW)
    since_ms = NOW_MS - int(window.total_seconds() * 1000)
    with sqlite3.connect(path) as connection:
        requests, cost, unrouted = connection.execute(
            "SELECT sum(provider != ''), total(CASE WHEN provider != '' THEN cost_usd END), "
            "sum(provider = '') FROM requests WHERE at_unix_ms >= ?", (since_ms,)).fetchone()
    assert (savings.requests, savings.unrouted) == (requests, unrouted)
    assert savings.actual_usd == pytest.approx(cost)
