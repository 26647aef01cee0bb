"""Hourly rollups of the ledger, kept by its writer, so reports over months read thousands of
rows instead of millions.

`requests_hourly` holds, per (hour, model, provider, status), the request count and the exact
sums report and savings need (cost, tokens by kind, estimated, failovers);
`latency_hourly` holds, per (hour, provider, latency bucket), a request count: a histogram of
total_ms in log buckets BUCKETS_PER_E to the e-fold (2 % wide), from which a percentile is the
middle of its bucket, within BUCKET_ERROR of the exact value.

Consistency: each batch rolls up exactly the rows it inserted (the ids above the largest id
before the batch: a request id already booked is ignored by INSERT OR IGNORE and gets no id, so
it is never counted twice); pruning drops the hours wholly before the cutoff and rebuilds the
hour the cutoff falls in from the rows left; a ledger from before rollups is backfilled once,
when it is opened (schema version 6).

Readers take the whole hours of a window from the rollups and the partial hour at its start
from the raw rows (indexed on at_unix_ms): `window_sums`, `window_histogram`.
"""

from __future__ import annotations

import math
import sqlite3

HOUR_MS = 3_600_000
BUCKETS_PER_E = 50
BUCKET_ERROR = math.exp(0.5 / BUCKETS_PER_E) - 1
"""Largest relative error of a bucketed percentile (about 1 %)."""
BUCKET = f"CAST(floor(ln(max(total_ms, 0.001)) * {BUCKETS_PER_E}) AS INTEGER)"
SUMS = ("count(*)", "total(cost_usd)", "sum(estimated)", "total(input_tokens)",
        "total(output_tokens)", "total(cached_input_tokens)", "total(cache_write_tokens)",
        "total(reasoning_tokens)", "sum(attempts > 1)", "total(max(attempts - 1, 0))")
SUM_COLUMNS = ("requests", "cost_usd", "estimated", "input_tokens", "output_tokens",
               "cached_input_tokens", "cache_write_tokens", "reasoning_tokens", "failed_over",
               "extra_attempts")
_KINDS = (int, float, int, float, float, float, float, float, int, int)
"""The type of each of SUM_COLUMNS (SQLite's total() is a float)."""
_KEY = ("hour", "model", "provider", "status")
SCHEMA = (
    ("CREATE TABLE IF NOT EXISTS requests_hourly (hour INTEGER NOT NULL, model TEXT NOT NULL, "
     "provider TEXT NOT NULL, status INTEGER NOT NULL, "
     + ", ".join(f"{name} NUMERIC NOT NULL" for name in SUM_COLUMNS)
     + ", PRIMARY KEY (hour, model, provider, status)) WITHOUT ROWID"),
    ("CREATE TABLE IF NOT EXISTS latency_hourly (hour INTEGER NOT NULL, provider TEXT NOT NULL, "
     "bucket INTEGER NOT NULL, requests INTEGER NOT NULL, "
     "PRIMARY KEY (hour, provider, bucket)) WITHOUT ROWID"),
)
_HOUR = f"at_unix_ms / {HOUR_MS}"


def _add_sums(where: str) -> str:
    updates = ", ".join(f"{name} = {name} + excluded.{name}" for name in SUM_COLUMNS)
    return (f"INSERT INTO requests_hourly ({', '.join(_KEY + SUM_COLUMNS)}) "
            f"SELECT {_HOUR}, model, provider, status, {', '.join(SUMS)} FROM requests "
            f"WHERE {where} GROUP BY 1, 2, 3, 4 "
            f"ON CONFLICT ({', '.join(_KEY)}) DO UPDATE SET {updates}")


def _add_latency(where: str) -> str:
    return ("INSERT INTO latency_hourly (hour, provider, bucket, requests) "
            f"SELECT {_HOUR}, provider, {BUCKET}, count(*) FROM requests WHERE {where} "
            "GROUP BY 1, 2, 3 ON CONFLICT (hour, provider, bucket) "
            "DO UPDATE SET requests = requests + excluded.requests")


def last_id(connection: sqlite3.Connection) -> int:
    """The largest request row id: a batch inserted after it rolls up the ids above it."""
    return connection.execute("SELECT coalesce(max(id), 0) FROM requests").fetchone()[0]


def roll_up_after(connection: sqlite3.Connection, after_id: int) -> None:
    """Add the rows with id > after_id (the ones a batch just inserted) to the rollups."""
    for statement in (_add_sums("id > ?"), _add_latency("id > ?")):
        connection.execute(statement, (after_id,))


def rebuild(connection: sqlite3.Connection) -> None:
    """Roll up every row anew (a ledger from before rollups, or one filled by hand)."""
    connection.execute("DELETE FROM requests_hourly")
    connection.execute("DELETE FROM latency_hourly")
    for statement in (_add_sums("1"), _add_latency("1")):
        connection.execute(statement)


def prune_before(connection: sqlite3.Connection, cutoff_ms: int) -> None:
    """After rows before cutoff_ms were deleted: drop the hours up to the cutoff's and roll
    that hour up again from the rows left in it."""
    hour = cutoff_ms // HOUR_MS
    for table in ("requests_hourly", "latency_hourly"):
        connection.execute(f"DELETE FROM {table} WHERE hour <= ?", (hour,))
    where = "at_unix_ms >= ? AND at_unix_ms < ?"
    for statement in (_add_sums(where), _add_latency(where)):
        connection.execute(statement, (hour * HOUR_MS, (hour + 1) * HOUR_MS))


def _first_hour(since_ms: int) -> int:
    """The first whole hour at or after since_ms."""
    return -(-since_ms // HOUR_MS)


def window_sums(connection: sqlite3.Connection, since_ms: int, by: tuple[str, ...]
                ) -> list[tuple]:
    """(*by, *SUM_COLUMNS) per group of `by` (from model, provider, status) over the rows at
    or after since_ms: whole hours from requests_hourly, the partial first hour from the rows."""
    first = _first_hour(since_ms)
    keys = ", ".join(by)
    sums = ", ".join(f"total({name})" for name in SUM_COLUMNS)
    parts = (f"SELECT {keys}, {', '.join(SUM_COLUMNS)} FROM requests_hourly WHERE hour >= ? "
             f"UNION ALL SELECT {keys}, {', '.join(SUMS)} FROM requests "
             f"WHERE at_unix_ms >= ? AND at_unix_ms < ? GROUP BY {keys}")
    rows = connection.execute(f"SELECT {keys}, {sums} FROM ({parts}) GROUP BY {keys}",
                              (first, since_ms, first * HOUR_MS)).fetchall()
    width = len(by)
    return [(*row[:width], *(kind(value) for kind, value in zip(_KINDS, row[width:], strict=True)))
            for row in rows]


def window_histogram(connection: sqlite3.Connection, since_ms: int) -> list[tuple[str, int, int]]:
    """(provider, bucket, requests) over the rows at or after since_ms, as window_sums."""
    first = _first_hour(since_ms)
    return connection.execute(
        "SELECT provider, bucket, sum(n) FROM ("
        "SELECT provider, bucket, requests AS n FROM latency_hourly WHERE hour >= ? "
        f"UNION ALL SELECT provider, {BUCKET} AS bucket, count(*) FROM requests "
        "WHERE at_unix_ms >= ? AND at_unix_ms < ? GROUP BY 1, 2) GROUP BY provider, bucket",
        (first, since_ms, first * HOUR_MS)).fetchall()


def bucket_middle(bucket: int) -> float:
    """The latency a bucketed percentile reports: the bucket's geometric middle."""
    return math.exp((bucket + 0.5) / BUCKETS_PER_E)
