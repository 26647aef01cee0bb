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


def rows_after(
    connection: sqlite3.Connection, query: TrailQuery, after_id: int = 0
) -> Iterator[tuple[int, LedgerRow]]:
    """(row id, row) of every request `query` selects booked after row `after_id`, in booking
    order, read a page at a time."""
    by_client = query.client is not None
    params: tuple[object, ...] = (query.since_ms, query.client) if by_client else (query.since_ms,)
    statement = (f"SELECT id, {', '.join(COLUMNS)} FROM requests WHERE id > ? AND at_unix_ms >= ?"
                 f"{' AND client = ?' if by_client else ''} ORDER BY id LIMIT ?")
    while True:
        page = connection.execute(statement, (after_id, *params, PAGE_ROWS)).fetchall()
        for values in page:
            after_id = values[0]
            yield after_id, row_from_columns(values[1:])
        if len(page) < PAGE_ROWS:
            return
