"""The failed upstream attempts of each request, kept in the ledger's database for `why`.

The edges log only failed attempts (the router's upstream_log, translate/listeners.py
failed_attempts_only); each believed one (telemetry/validation.py attempt_problem) with a request
id becomes one row: when it started (each attempt's own start, on the edge's clock, which is the
same clock for every attempt of a request, so it orders them), the provider, the provider's status (0 when it gave none), Envoy's response
flags by their short names and how long it took. A served request adds no row: its last attempt
is the request's own ledger row. Rows go through the ledger's batched writer and are pruned with
its retention (store.py); `why` reads them back by request id (`attempts_of`).
"""

from __future__ import annotations

import sqlite3
from dataclasses import astuple, dataclass, fields

from envoy.data.accesslog.v3 import accesslog_pb2

from control_plane.telemetry.response_flags import FLAG_NAMES
from control_plane.telemetry.samples import RequestSample, unix_ms

FLAG_MEANINGS = {
    "UF": "connection failed", "UR": "reset by the provider", "UC": "connection closed",
    "UO": "circuit breaker open", "UT": "timed out", "URX": "retries exhausted",
    "UPE": "protocol error", "UMSDR": "max stream duration", "UH": "no healthy host",
}
"""What the flags that blame a provider (listeners.FAILED_ATTEMPT_FLAGS) mean, for `why`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptRow:
    """One failed upstream attempt; field order is the column order."""

    request_id: str
    """The edge's request id: the ledger row of the request it belongs to."""
    at_unix_ms: int
    """When the attempt started, by the edge's clock."""
    provider: str
    status: int
    """The provider's status for this attempt; 0 when it gave none (refused, reset, timeout)."""
    flags: str
    """Envoy's response flags by short name, comma-separated ("" when none)."""
    duration_ms: float
    """What the attempt took (samples.upstream_latencies' total, as health counts it)."""

    @classmethod
    def of(cls, entry: accesslog_pb2.HTTPAccessLogEntry,
           sample: RequestSample) -> AttemptRow | None:
        """The row of a believed attempt entry and its health sample; None without a request
        id (nothing to tell it under)."""
        if not sample.request_id:
            return None
        flags = entry.common_properties.response_flags
        return cls(request_id=sample.request_id,
                   at_unix_ms=unix_ms(entry.common_properties.start_time),
                   provider=sample.provider, status=sample.status,
                   flags=",".join(short for name, short in FLAG_NAMES.items()
                                  if getattr(flags, name)),
                   duration_ms=sample.total_ms)

    def outcome(self) -> str:
        """e.g. "503 after 12 ms", "timed out (UT) after 1000 ms"."""
        said = [str(self.status)] if self.status else []
        said += [f"{FLAG_MEANINGS[flag]} ({flag})" if flag in FLAG_MEANINGS else flag
                 for flag in self.flags.split(",") if flag]
        return f"{', '.join(said) or 'failed'} after {self.duration_ms:.0f} ms"

    def values(self) -> tuple[object, ...]:
        return astuple(self)


ATTEMPT_COLUMNS = tuple(f.name for f in fields(AttemptRow))
ATTEMPTS_SCHEMA = (
    ("CREATE TABLE IF NOT EXISTS attempts (request_id TEXT NOT NULL, "
     "at_unix_ms INTEGER NOT NULL, provider TEXT NOT NULL, status INTEGER NOT NULL, "
     "flags TEXT NOT NULL, duration_ms REAL NOT NULL)"),
    "CREATE INDEX IF NOT EXISTS attempts_request_id ON attempts (request_id)",
    "CREATE INDEX IF NOT EXISTS attempts_at ON attempts (at_unix_ms)",
)
ATTEMPTS_INSERT = (f"INSERT INTO attempts ({', '.join(ATTEMPT_COLUMNS)}) "
                   f"VALUES ({', '.join('?' for _ in ATTEMPT_COLUMNS)})")
ATTEMPTS_PRUNE = "DELETE FROM attempts WHERE at_unix_ms < ?"


def attempts_of(connection: sqlite3.Connection, request_id: str) -> list[AttemptRow]:
    """The request's failed attempts in the order they started; none from a ledger older
    than the table (`why` opens it read-only, so it is not upgraded)."""
    if connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                          "AND name = 'attempts'").fetchone() is None:
        return []
    return [AttemptRow(**dict(zip(ATTEMPT_COLUMNS, found, strict=True)))  # type: ignore[arg-type]
            for found in connection.execute(
                f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM attempts WHERE request_id = ? "
                "ORDER BY at_unix_ms, rowid", (request_id,))]
