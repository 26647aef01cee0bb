"""The usage ledger: one row per request in SQLite (stdlib sqlite3, WAL mode).

Rows are written by LedgerWriter in batches from a background thread (see
batching.py): every 0.5 s or every 200 rows, whichever comes first, each batch in
one transaction. A crash (kill -9, power loss after WAL sync) therefore loses at
most the rows added since the last committed batch: the last 0.5 s of requests or
200 requests, whichever is fewer. A clean close() loses nothing.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, fields
from pathlib import Path
from typing import get_type_hints

from control_plane.ledger.batching import BackgroundBatcher
from control_plane.usage.normalise import Usage
from control_plane.usage.record import RequestRecord

FLUSH_INTERVAL_S = 0.5
MAX_BATCH_ROWS = 200
SCHEMA_VERSION = 1


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


COLUMNS = tuple(f.name for f in fields(LedgerRow))
_SQL_TYPES = {int: "INTEGER", bool: "INTEGER", float: "REAL", str: "TEXT"}
_COLUMN_TYPES = {name: _SQL_TYPES[kind] for name, kind in get_type_hints(LedgerRow).items()}
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS requests (id INTEGER PRIMARY KEY, "
    + ", ".join(f"{name} {_COLUMN_TYPES[name]} NOT NULL" for name in COLUMNS)
    + ")",
    "CREATE INDEX IF NOT EXISTS requests_at ON requests (at_unix_ms)",
)
_INSERT = (f"INSERT INTO requests ({', '.join(COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in COLUMNS)})")


def ledger_row(record: RequestRecord, usage: Usage, cost_usd: float) -> LedgerRow:
    return LedgerRow(
        at_unix_ms=record.at_unix_ms, request_id=record.request_id, model=record.model,
        provider=record.provider, policy=record.policy, strategy=record.strategy,
        reason=record.reason, attempts=record.attempts, status=record.status,
        stream=record.stream, ttfb_ms=record.ttfb_ms, total_ms=record.total_ms,
        reported_tokens=json.dumps(dict(usage.reported), separators=(",", ":"), sort_keys=True),
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens, reasoning_tokens=usage.reasoning_tokens,
        estimated=usage.estimated, estimate_reason=usage.estimate_reason, cost_usd=cost_usd,
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
        for statement in _SCHEMA:
            connection.execute(statement)
        connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    return connection


def read_rows(connection: sqlite3.Connection, since_unix_ms: int = 0) -> list[LedgerRow]:
    """Rows at or after `since_unix_ms`, oldest first."""
    cursor = connection.execute(
        f"SELECT {', '.join(COLUMNS)} FROM requests WHERE at_unix_ms >= ? ORDER BY at_unix_ms, id",
        (since_unix_ms,))
    return [_row(values) for values in cursor]


def _row(values: tuple[object, ...]) -> LedgerRow:
    typed = {name: bool(value) if name in ("stream", "estimated") else value
             for name, value in zip(COLUMNS, values, strict=True)}
    return LedgerRow(**typed)  # type: ignore[arg-type]


class LedgerWriter:
    """Batched, non-blocking appends to the ledger (see the module docstring for the loss bound).

    The SQLite connection is used only by the batcher's thread, and closed by close().
    """

    def __init__(self, path: str | Path | None = None, *,
                 flush_interval_s: float = FLUSH_INTERVAL_S,
                 max_batch: int = MAX_BATCH_ROWS) -> None:
        self.path = Path(path) if path is not None else default_ledger_path()
        self._connection = open_ledger(self.path)
        self._batcher: BackgroundBatcher[LedgerRow] = BackgroundBatcher(
            self._write, name=f"ledger-writer:{self.path}", interval_s=flush_interval_s,
            max_batch=max_batch)

    @property
    def dropped(self) -> int:
        """Rows lost to SQLite errors (each logged)."""
        return self._batcher.dropped

    def add(self, row: LedgerRow) -> None:
        """O(1), never waits for the disk."""
        self._batcher.add(row)

    def close(self) -> None:
        """Commits every row added so far, then closes the database."""
        self._batcher.close()
        self._connection.close()

    def _write(self, rows: list[LedgerRow]) -> None:
        with self._connection:
            self._connection.executemany(_INSERT, [tuple(getattr(row, name) for name in COLUMNS) for row in rows])
