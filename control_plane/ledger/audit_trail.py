"""The audit trail read from the ledger: what `gpu-router audit` prints (audit.py says why it is
rendered on read rather than written per request).

Rows come in booking order (the ledger's row id), so following the trail prints each request
once, as it is committed, and never one twice; the window is on the request's start time, as
in every report.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

from control_plane.ledger.store import COLUMNS, LedgerRow, row_from_columns

PAGE_ROWS = 1000
"""Rows read per query: a long window is read a page at a time, in bounded memory."""


@dataclass(frozen=True, slots=True)
class TrailQuery:
    """Which booked requests: those that started at or after `since_ms`, of `client` when
    given (the client's key name in the policy)."""

    since_ms: int
    client: str | None = None


def _before_window(connection: sqlite3.Connection, since_ms: int) -> int:
    """A row id below every request booked so far that started at or after `since_ms`, from the
    start-time index: the first page then skips the older rows instead of scanning them all."""
    [(first,)] = connection.execute(
        "SELECT min(id) FROM requests INDEXED BY requests_at WHERE at_unix_ms >= ?", (since_ms,)
    ).fetchall()
    if first is not None:
        return int(first) - 1
    # None started in the window yet: any that do are booked after the newest row.
    [(newest,)] = connection.execute("SELECT coalesce(max(id), 0) FROM requests").fetchall()
    return int(newest)


def rows_after(
    connection: sqlite3.Connection, query: TrailQuery, after_id: int = 0
) -> Iterator[tuple[int, LedgerRow]]:
    """(row id, row) of every request `query` selects booked after row `after_id`, in booking
    order, read a page at a time."""
    by_client = query.client is not None
    params: tuple[object, ...] = (query.since_ms, query.client) if by_client else (query.since_ms,)
    # Paged along the row id; `+client` keeps SQLite on that order instead of the client index
    # and a sort per page (quadratic in the client's rows).
    statement = (f"SELECT id, {', '.join(COLUMNS)} FROM requests WHERE id > ? AND at_unix_ms >= ?"
                 f"{' AND +client = ?' if by_client else ''} ORDER BY id LIMIT ?")
    if after_id == 0:  # a follow-up call (audit --follow) is already past the window's start
        after_id = _before_window(connection, query.since_ms)
    while True:
        page = connection.execute(statement, (after_id, *params, PAGE_ROWS)).fetchall()
        for values in page:
            after_id = values[0]
            yield after_id, row_from_columns(values[1:])
        if len(page) < PAGE_ROWS:
            return
