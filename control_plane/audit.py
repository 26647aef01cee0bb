"""The routing audit trail: one JSON object per request, the decision and then its outcome.

An entry answers "why did this request go there, and what happened": every candidate with its
score or the reason it was excluded, the choice, the fallback order and the reason, then who
served after any failover, attempts, latency, status, tokens and cost. Every one of those is a
column of the request's ledger row, so the trail is rendered on read from the ledger
(`gpu-router audit`, ledger/audit_trail.py): booking a request writes no JSON, and the trail
holds each request exactly once, as the ledger does.

An operator who ships a file (a SIEM, logrotate) may also ask for one (`--audit-log`): the same
entries, rendered from the ledger rows as they are booked and written by a background thread in
batches (like the ledger, see control_plane/ledger/batching.py), so `add` never waits for the
disk; a crash loses at most the last 0.5 s / 200 lines, and a request booked just before a
SIGKILL can appear twice there. The file is rotated by size, as logrotate would: once it
reaches `max_bytes` it becomes audit.jsonl.1 (the older ones shift to .2, ...; the one past
`keep` is deleted) and a new file starts, so it never holds more than about
(keep + 1) x max_bytes.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from control_plane.ledger.batching import BackgroundBatcher
from control_plane.ledger.store import LedgerRow

EXCLUDED_PREFIX = "x:"
MAX_BYTES = 100 * 1024 * 1024
KEEP_ROTATED = 5


def parse_candidates(summary: str) -> list[dict[str, Any]]:
    """ext_proc's "a=0.0001;b=x:gpu too small" -> [{"provider", "score"} | {"provider",
    "excluded"}], in its (rank) order. Never raises: an unreadable entry keeps its text."""
    candidates: list[dict[str, Any]] = []
    for entry in filter(None, (part.strip() for part in summary.split(";"))):
        provider, _, value = entry.partition("=")
        if value.startswith(EXCLUDED_PREFIX):
            candidates.append({"provider": provider, "excluded": value[len(EXCLUDED_PREFIX):]})
            continue
        try:
            candidates.append({"provider": provider, "score": float(value)})
        except ValueError:
            candidates.append({"provider": provider, "unparsed": value})
    return candidates


def chosen(candidates: list[dict[str, Any]]) -> str:
    """ext_proc's choice among parse_candidates' entries: the first scored one (it lists them in
    rank order); "" when it scored none (it did not decide: its fallback route)."""
    return next((c["provider"] for c in candidates if "score" in c), "")


def audit_entry(row: LedgerRow) -> dict[str, Any]:
    """The audit entry of a booked request."""
    candidates = parse_candidates(row.candidates)
    choice = chosen(candidates)
    at = datetime.fromtimestamp(row.at_unix_ms / 1000, tz=UTC)
    return {
        "at": at.isoformat(timespec="milliseconds"),
        "request_id": row.request_id,
        "client": row.client,
        "client_request_id": row.client_request_id,
        "model": row.model,
        "policy": row.policy,
        "strategy": row.strategy,
        "candidates": candidates,
        "choice": choice,
        "fallbacks": row.fallbacks.split(",") if row.fallbacks else [],
        "reason": row.reason,
        "outcome": {
            "provider": row.provider,
            "failed_over": bool(row.provider) and row.provider != choice,
            "attempts": row.attempts,
            "status": row.status,
            "ttfb_ms": row.ttfb_ms,
            "total_ms": row.total_ms,
            "stream": row.stream,
            "tokens": {
                "input": row.input_tokens,
                "output": row.output_tokens,
                "cached_input": row.cached_input_tokens,
                "cache_write": row.cache_write_tokens,
                "reasoning": row.reasoning_tokens,
            },
            "reported": json.loads(row.reported_tokens),
            "estimated": row.estimated,
            "estimate_reason": row.estimate_reason,
            "cost_usd": row.cost_usd,
        },
    }


_compact_json = json.JSONEncoder(separators=(",", ":")).encode
"""One encoder for every line (json.dumps with options builds one per call), as the ledger's
row does (store.py)."""


def audit_line(row: LedgerRow) -> str:
    """The entry as one compact JSON line (no newline)."""
    return _compact_json(audit_entry(row))


class AuditLog:
    """The opt-in audit file: appends the entries of booked rows to `path` (created with its
    directory) from a background thread."""

    def __init__(self, path: str | Path, *, flush_interval_s: float = 0.5,
                 max_batch: int = 200, max_bytes: int = MAX_BYTES,
                 keep: int = KEEP_ROTATED) -> None:
        if max_bytes < 1 or keep < 0:
            raise ValueError(f"need max_bytes >= 1 and keep >= 0, got {max_bytes}, {keep}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._max_bytes = max_bytes
        self._keep = keep
        self._file: TextIO = self.path.open("a", encoding="utf-8", buffering=1)
        self._batcher: BackgroundBatcher[LedgerRow] = (
            BackgroundBatcher(self._write, name=f"audit-log:{self.path}",
                              interval_s=flush_interval_s, max_batch=max_batch))

    def add(self, row: LedgerRow) -> None:
        """O(1): the line is rendered and written later, off the caller's thread."""
        self._batcher.add(row)

    def close(self) -> None:
        """Writes every line added so far, then closes the file."""
        self._batcher.close()
        self._file.close()

    def rotated(self, index: int) -> Path:
        """The index-th rotated file (1 = the newest)."""
        return self.path.with_name(f"{self.path.name}.{index}")

    def _write(self, batch: list[LedgerRow]) -> None:
        self._file.write("".join(audit_line(row) + "\n" for row in batch))
        if self._file.tell() >= self._max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._file.close()
        if self._keep == 0:
            self.path.unlink()
        else:
            self.rotated(self._keep).unlink(missing_ok=True)
            for index in range(self._keep - 1, 0, -1):
                if self.rotated(index).exists():
                    self.rotated(index).rename(self.rotated(index + 1))
            self.path.rename(self.rotated(1))
        self._file = self.path.open("a", encoding="utf-8", buffering=1)
