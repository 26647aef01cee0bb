"""The usage ledger: one row per request in SQLite (stdlib sqlite3, WAL mode).

Rows are written by LedgerWriter in batches from a background thread (see
batching.py): every 0.5 s or every 200 rows, whichever comes first, each batch in
one transaction. A crash (kill -9, power loss after WAL sync) therefore loses at
most the rows added since the last committed batch: the last 0.5 s of requests or
200 requests, whichever is fewer. A clean close() loses nothing. A batch that fails is
retried a few times, then dropped and counted (batching.py).

Each request has at most one row: the UNIQUE key is its start time and id, which the gRPC
access log and the edges' durable logs report alike (both are Envoy's start time, read to the
millisecond the same way), and inserts that repeat one are ignored, so the access log and the
reconciler that replays the durable logs (reconcile.py) never book a request twice. The key
leads with the start time so that a batch's rows land at the end of the index, as they do in
the table: keyed by the random request id alone, each row was written into a page of its own
across the whole index, which cost more per row as the ledger grew (10.8 us a row empty,
17.5-21.3 at 0.2-1 million rows, against 6.7-9.5 at any size led by the time). A lookup by id
alone (`gpu-router why`) reads the key newest first. Rows older than the retention are
deleted by the writer thread (at open, then hourly). The reconciler's read position in each
edge file is kept in the same database and written through the same batches, after the rows
booked before it: a committed position means every request before it is in the ledger. So is
the fleet's health history (health_history.py) and each request's failed upstream attempts
(attempts.py), pruned with the same retention. Each batch also adds the rows it inserted to
the hourly rollups that reports read (rollup.py).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from pathlib import Path
from typing import get_type_hints

from control_plane.ledger import rollup
from control_plane.ledger.attempts import (
    ATTEMPTS_INSERT,
    ATTEMPTS_PRUNE,
    ATTEMPTS_SCHEMA,
    AttemptRow,
)
from control_plane.ledger.batching import BackgroundBatcher
from control_plane.ledger.health_history import HISTORY_INSERT, HISTORY_SCHEMA, HealthRow
from control_plane.usage.normalise import Usage
from control_plane.usage.record import RequestRecord

FLUSH_INTERVAL_S = 0.5
MAX_BATCH_ROWS = 200
SCHEMA_VERSION = 8
RETENTION_DAYS = 90
PRUNE_INTERVAL_S = 3600.0
_DAY_MS = 86_400_000

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerRow:
    """One ledger row; field order is the column order."""

    at_unix_ms: int
    request_id: str
    model: str
    provider: str
    """Who served after any failover; "" when nobody did."""
    policy: str
    strategy: str
    reason: str
    attempts: int
    status: int
    stream: bool
    ttfb_ms: float
    total_ms: float
    reported_tokens: str
    """The provider's own usage fields as a JSON object ("{}" when estimated)."""
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    estimated: bool
    estimate_reason: str
    cost_usd: float
    client: str = ""
    """The client whose key the request carried (the policy's clients); "" when none."""
    client_request_id: str = ""
    """The x-request-id the client sent ("" when none); request_id is the edge's own."""
    candidates: str = ""
    """ext_proc's candidate summary in rank order (audit.parse_candidates reads it): what
    `gpu-router why` shows and `replay` compares with; "" when ext_proc did not decide."""
    fallbacks: str = ""
    """The providers Envoy could fail over to, in order, comma-separated."""
    path: str = ""
    """The request's path as ext_proc saw it (policies match on it)."""
    request_bytes: int = 0
    """Request body size: ext_proc's prompt estimate is a quarter of it."""
    max_tokens: int = -1
    """max_completion_tokens or max_tokens from the body; -1 when it gave none."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LogOffset:
    """How far the reconciler has booked one edge log file (by path and inode)."""

    path: str
    inode: int
    offset: int


COLUMNS = tuple(f.name for f in fields(LedgerRow))
_SQL_TYPES = {int: "INTEGER", bool: "INTEGER", float: "REAL", str: "TEXT"}
_COLUMN_TYPES = {name: _SQL_TYPES[kind] for name, kind in get_type_hints(LedgerRow).items()}
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS requests (id INTEGER PRIMARY KEY, "
    + ", ".join(f"{name} {_COLUMN_TYPES[name]} NOT NULL" for name in COLUMNS)
    + ")",
    # Versions 2-7 keyed rows by the request id alone, with an index of the time beside it; the
    # key keeps that index's name, which read-only readers of either version name (audit_trail).
    "DROP INDEX IF EXISTS requests_request_id",
    "DROP INDEX IF EXISTS requests_at",
    "CREATE UNIQUE INDEX IF NOT EXISTS requests_at ON requests (at_unix_ms, request_id)",
    "CREATE INDEX IF NOT EXISTS requests_client_at ON requests (client, at_unix_ms)",
    ("CREATE TABLE IF NOT EXISTS edge_log_offsets (path TEXT PRIMARY KEY, "
     "inode INTEGER NOT NULL, offset INTEGER NOT NULL)"),
    *HISTORY_SCHEMA,
    *rollup.SCHEMA,
    *ATTEMPTS_SCHEMA,  # version 7
)
_ROW_VALUES = attrgetter(*COLUMNS)
"""A LedgerRow's values in column order, in one call (the writer's thread runs it per row)."""
_INSERT = (f"INSERT OR IGNORE INTO requests ({', '.join(COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in COLUMNS)})")


SELECT_ROW = f"SELECT {', '.join(COLUMNS)} FROM requests"
"""Every column of a row, in LedgerRow's order (row_from_columns reads the result)."""


def row_from_columns(values: Sequence[object]) -> LedgerRow:
    """The LedgerRow of a SELECT_ROW result (SQLite keeps the bools as 0/1)."""
    row = dict(zip(COLUMNS, values, strict=True))
    row["stream"], row["estimated"] = bool(row["stream"]), bool(row["estimated"])
    return LedgerRow(**row)  # type: ignore[arg-type]


_reported_json = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode
"""json.dumps with these options builds an encoder per call (~2 us of a row's ~6 us); one."""


def ledger_row(record: RequestRecord, usage: Usage, cost_usd: float) -> LedgerRow:
    return LedgerRow(
        at_unix_ms=record.at_unix_ms, request_id=record.request_id, model=record.model,
        provider=record.provider, policy=record.policy, strategy=record.strategy,
        reason=record.reason, attempts=record.attempts, status=record.status,
        stream=record.stream, ttfb_ms=record.ttfb_ms, total_ms=record.total_ms,
        reported_tokens=_reported_json(dict(usage.reported)),
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens, reasoning_tokens=usage.reasoning_tokens,
        estimated=usage.estimated, estimate_reason=usage.estimate_reason, cost_usd=cost_usd,
        client=record.client, client_request_id=record.client_request_id,
        candidates=record.candidates, fallbacks=",".join(record.fallbacks), path=record.path,
        request_bytes=record.request_bytes, max_tokens=record.max_tokens,
    )


def data_dir() -> Path:
    """$XDG_DATA_HOME/gpu-router, else ~/.local/share/gpu-router: the ledger and audit log."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "gpu-router"


def default_ledger_path() -> Path:
    return data_dir() / "ledger.db"


def open_ledger(path: str | Path) -> sqlite3.Connection:
    """A connection to the ledger at `path` (created with its directory), in WAL mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    with connection:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version < SCHEMA_VERSION:
            connection.execute(_SCHEMA[0])
            _add_missing_columns(connection)
            if version < 2:  # no unique key yet: keep the first row of a repeated request id
                connection.execute("DELETE FROM requests WHERE id NOT IN "
                                   "(SELECT min(id) FROM requests GROUP BY request_id)")
            for statement in _SCHEMA[1:]:
                connection.execute(statement)
            if version < 6:  # the hourly rollups came in version 6: backfill them once
                rollup.rebuild(connection)
            connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            if version:  # a ledger of an older release, which may have taken a while
                log.info("ledger schema upgraded", extra={
                    "path": str(path), "from_version": version, "to_version": SCHEMA_VERSION})
    return connection


def _add_missing_columns(connection: sqlite3.Connection) -> None:
    """Columns added since a ledger was created (client in version 3, client_request_id in 4,
    candidates .. max_tokens in 5); the rows already there get '' or 0."""
    present = {row[1] for row in connection.execute("PRAGMA table_info(requests)")}
    for name in COLUMNS:
        if name not in present:
            literal = "''" if _COLUMN_TYPES[name] == "TEXT" else "0"
            connection.execute(f"ALTER TABLE requests ADD COLUMN {name} "
                               f"{_COLUMN_TYPES[name]} NOT NULL DEFAULT {literal}")


def prune(connection: sqlite3.Connection, retention_days: float, now_ms: int) -> int:
    """Delete rows that started more than `retention_days` before `now_ms`; how many."""
    cutoff = now_ms - int(retention_days * _DAY_MS)
    with connection:
        connection.execute("DELETE FROM health_history WHERE at_unix_ms < ?", (cutoff,))
        connection.execute(ATTEMPTS_PRUNE, (cutoff,))
        deleted = connection.execute("DELETE FROM requests WHERE at_unix_ms < ?",
                                     (cutoff,)).rowcount
        rollup.prune_before(connection, cutoff)
        return deleted


_KNOWN = "SELECT request_id FROM requests WHERE at_unix_ms = ? AND request_id = ?"


def known_request_ids(connection: sqlite3.Connection,
                      requests: Iterable[tuple[int, str]]) -> set[str]:
    """The ids of `requests`, (start ms, request id) pairs, that already have a row: one seek
    in the unique key each."""
    return {request_id for key in dict.fromkeys(requests)
            for request_id in connection.execute(_KNOWN, key).fetchone() or ()}


def read_offsets(connection: sqlite3.Connection) -> dict[str, LogOffset]:
    """The reconciler's committed position in each edge log file, by path."""
    return {path: LogOffset(path=path, inode=inode, offset=offset)
            for path, inode, offset in connection.execute(
                "SELECT path, inode, offset FROM edge_log_offsets")}


def read_rows(connection: sqlite3.Connection, since_unix_ms: int = 0) -> list[LedgerRow]:
    """Rows at or after `since_unix_ms`, oldest first."""
    cursor = connection.execute(
        f"{SELECT_ROW} WHERE at_unix_ms >= ? ORDER BY at_unix_ms, id", (since_unix_ms,))
    return [row_from_columns(values) for values in cursor]


_Item = LedgerRow | LogOffset | HealthRow | AttemptRow
"""What goes through the writer's batches."""


class LedgerWriter:
    """Batched, non-blocking appends to the ledger (see the module docstring for the loss bound).

    The SQLite connection is used only by the batcher's thread, and closed by close().
    """

    def __init__(self, path: str | Path | None = None, *,
                 flush_interval_s: float = FLUSH_INTERVAL_S,
                 max_batch: int = MAX_BATCH_ROWS,
                 retention_days: float = RETENTION_DAYS,
                 on_drop: Callable[[int, BaseException], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if retention_days <= 0:
            raise ValueError(f"retention_days must be > 0, got {retention_days}")
        self.path = Path(path) if path is not None else default_ledger_path()
        self._connection = open_ledger(self.path)
        self._retention_days = retention_days
        self._clock = clock
        self._pruned_at = float("-inf")
        self._on_drop = on_drop
        self.dropped = 0
        """Rows lost after every retry failed (each drop is logged)."""
        self._prune_if_due()
        self._batcher: BackgroundBatcher[_Item] = BackgroundBatcher(
            self._write, name=f"ledger-writer:{self.path}", interval_s=flush_interval_s,
            max_batch=max_batch, on_drop=self._dropped)

    def add(self, row: LedgerRow) -> None:
        """O(1), never waits for the disk."""
        self._batcher.add(row)

    def add_offset(self, offset: LogOffset) -> None:
        """Record the reconciler's position; committed with or after every row added before."""
        self._batcher.add(offset)

    def add_health(self, row: HealthRow) -> None:
        """One health-history row (health_history.py), written with the next batch."""
        self._batcher.add(row)

    def add_attempt(self, row: AttemptRow) -> None:
        """One failed upstream attempt (attempts.py), written with the next batch."""
        self._batcher.add(row)

    def close(self) -> None:
        """Commits every row added so far, then closes the database."""
        self._batcher.close()
        self._connection.close()

    def _write(self, batch: list[_Item]) -> None:
        rows = [_ROW_VALUES(item) for item in batch if isinstance(item, LedgerRow)]
        history = [item.values() for item in batch if isinstance(item, HealthRow)]
        attempts = [item.values() for item in batch if isinstance(item, AttemptRow)]
        offsets = {item.path: item for item in batch if isinstance(item, LogOffset)}
        with self._connection:
            before = rollup.last_id(self._connection)
            self._connection.executemany(_INSERT, rows)
            rollup.roll_up_after(self._connection, before)
            self._connection.executemany(HISTORY_INSERT, history)
            self._connection.executemany(ATTEMPTS_INSERT, attempts)
            self._connection.executemany(
                "INSERT OR REPLACE INTO edge_log_offsets (path, inode, offset) VALUES (?, ?, ?)",
                [(o.path, o.inode, o.offset) for o in offsets.values()])
        self._prune_if_due()

    def _prune_if_due(self) -> None:
        now = self._clock()
        if now - self._pruned_at < PRUNE_INTERVAL_S:
            return
        self._pruned_at = now
        deleted = prune(self._connection, self._retention_days, int(now * 1000))
        if deleted:
            log.info("ledger pruned", extra={"rows": deleted, "retention_days": self._retention_days})

    def _dropped(self, batch: list[_Item], error: BaseException) -> None:
        rows = sum(isinstance(item, LedgerRow) for item in batch)
        self.dropped += rows
        if self._on_drop is not None and rows:
            self._on_drop(rows, error)
