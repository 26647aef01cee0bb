"""RequestRecord factory and real provider response texts for the usage/ledger/audit tests, and
a ledger turned back into the shape an older release left."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

from control_plane.usage.record import RequestRecord

BASE_RECORD = RequestRecord(
    request_id="req-1", at_unix_ms=1_700_000_000_000, model="llama-3.1-8b", policy="interactive",
    strategy="latency", reason="fastest: 42 ms EWMA", fallbacks=("runpod", "lambda"),
    candidates="coreweave=42.0;runpod=61.5;lambda=80.2;vast=x:gpu RTX-4090 (24 GB) too small",
    provider="coreweave", attempts=1, status=200, ttfb_ms=30.0, total_ms=55.0, stream=False,
    request_bytes=466, response_bytes=316, usage_text="",
)


def make_record(**changes: Any) -> RequestRecord:
    return replace(BASE_RECORD, **changes)


def as_version_7(ledger: Path) -> None:
    """The ledger's requests keyed as version 7 left them: by the request id alone, with an
    index of the start time beside it."""
    with sqlite3.connect(ledger) as connection:
        connection.execute("DROP INDEX requests_at")
        connection.execute("CREATE UNIQUE INDEX requests_request_id ON requests (request_id)")
        connection.execute("CREATE INDEX requests_at ON requests (at_unix_ms)")
        connection.execute("PRAGMA user_version=7")


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def captured_json_usage(body: dict[str, Any]) -> str:
    """What Envoy captures from a JSON response: the text from `"usage"` on."""
    text = compact(body)
    return text[text.index('"usage"'):]


def sse(events: list[dict[str, Any]]) -> str:
    return "".join(f"data: {compact(event)}\n\n" for event in events) + "data: [DONE]\n\n"
