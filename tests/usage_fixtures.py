"""RequestRecord factory and real provider response texts for the usage/ledger/audit tests."""

from __future__ import annotations

import json
from dataclasses import replace
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


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def captured_json_usage(body: dict[str, Any]) -> str:
    """What Envoy captures from a JSON response: the text from `"usage"` on."""
    text = compact(body)
    return text[text.index('"usage"'):]


def sse(events: list[dict[str, Any]]) -> str:
    return "".join(f"data: {compact(event)}\n\n" for event in events) + "data: [DONE]\n\n"
