"""What the dashboard page draws, as JSON, and the page's own files.

The admin HTTP server serves `dashboard_files()` under /dashboard and
`dashboard_data(metrics, now)` at GET /v1/dashboard; the page polls the latter every
2 s and draws everything itself (SVG), so it works with no network beyond the
control plane.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from importlib import resources
from typing import Any

from control_plane.metrics import (
    NO_PROVIDER,
    SERIES_BUCKET_S,
    SERIES_BUCKETS,
    Metrics,
    SeriesPoint,
)

DATA_PATH = "/v1/dashboard"
_FILES = {
    "/dashboard": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}


def dashboard_files() -> dict[str, tuple[str, bytes]]:
    """URL path -> (content type, bytes) for the page and its assets."""
    package = resources.files("control_plane.dashboard")
    return {path: (content_type, package.joinpath(name).read_bytes())
            for path, (name, content_type) in _FILES.items()}


def dashboard_data(metrics: Metrics, now: datetime,
                   clients: Sequence[Mapping[str, Any]] = (), *,
                   savings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The last hour (360 x 10 s buckets) per provider, per-provider totals over it, the
    requests over it that never reached a provider,
    the latest decisions (newest first), and per client (control_plane/client_spend.py) its
    totals since start and its budget, spend in the budget window and what remains; and the
    savings card's last figure (savings_card.py), None until there is one."""
    now_ms = int(now.timestamp() * 1000)
    since = now - timedelta(seconds=SERIES_BUCKET_S * SERIES_BUCKETS)
    series = metrics.series(int(since.timestamp() * 1000))
    # Requests that never reached a provider (refused at the edge, /v1/models) are no provider's.
    unrouted = series.pop(NO_PROVIDER, [])
    totals: dict[str, dict[str, Any]] = {}
    for provider, points in series.items():
        requests = sum(point.requests for point in points)
        errors = sum(point.errors for point in points)
        cost = sum(point.cost_usd for point in points)
        totals[provider] = {
            "requests": requests,
            "errors": errors,
            "success_rate": 1 - errors / requests if requests else None,
            "cost_usd": cost,
            "cost_per_request_usd": cost / requests if requests else None,
        }
    return {
        "now_unix_ms": now_ms,
        "bucket_s": SERIES_BUCKET_S,
        "providers": sorted(series),
        "series": {provider: [_point(point) for point in points]
                   for provider, points in series.items()},
        "totals": totals,
        "unrouted": {"requests": sum(point.requests for point in unrouted),
                     "errors": sum(point.errors for point in unrouted)},
        "decisions": metrics.recent_decisions(),
        "clients": [dict(row) for row in clients],
        "savings": None if savings is None else dict(savings),
    }


def _point(point: SeriesPoint) -> dict[str, Any]:
    data = asdict(point)
    data["success_rate"] = 1 - point.errors / point.requests if point.requests else None
    data["cost_per_request_usd"] = point.cost_usd / point.requests if point.requests else None
    return data
