"""What a simulated provider has received: how tests prove where the router sent a request.

Only API requests count; health checks and the /_sim control API do not.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LAST_BODY_CHARS = 65536
"""How much of the last request's body /_sim/stats shows (as text, undecodable bytes replaced)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedRequest:
    model: str | None
    """The body's "model" as sent (None when absent or the body is not JSON)."""
    path: str
    headers: Mapping[str, str]
    """Lower-case names, as received (injected credentials included: that is what tests check)."""
    body_bytes: int
    body: bytes = b""
    """The body as received: tests check which model the provider read, and nothing else."""


class SimStats:
    def __init__(self) -> None:
        self.requests = 0
        self.by_model: Counter[str] = Counter()
        self.by_path: Counter[str] = Counter()
        self.last_request: ReceivedRequest | None = None
        self.in_flight = 0
        self.peak_in_flight = 0
        """The most API requests it was answering at once: what proves a concurrency cap held."""

    def started(self) -> None:
        """An API request begins (ended() when its answer is written, however)."""
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def ended(self) -> None:
        self.in_flight -= 1

    def record(self, request: ReceivedRequest) -> int:
        """Count one API request; returns its sequence number (from 1)."""
        self.requests += 1
        self.by_path[request.path] += 1
        if request.model is not None:
            self.by_model[request.model] += 1
        self.last_request = request
        return self.requests

    def snapshot(self) -> dict[str, Any]:
        last = self.last_request
        return {
            "requests": self.requests,
            "by_model": dict(self.by_model),
            "by_path": dict(self.by_path),
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "last_request": None
            if last is None
            else {
                "model": last.model,
                "path": last.path,
                "headers": dict(last.headers),
                "body_bytes": last.body_bytes,
                "body": last.body[:LAST_BODY_CHARS].decode("utf-8", "replace"),
            },
        }
