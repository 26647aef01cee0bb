"""`gpu-router report`: spend, share, cost per request, latency and errors per provider.

Definitions (also in the table's footer):
- latency: total request latency as Envoy measured it; p50/p99 by nearest rank.
- error: the client got no success because of the upstream side: status 0 (no
  response), 429 or 5xx. Other 4xx are the client's own mistakes, not counted.
- a request that never reached a provider (refused at the edge: 400, 401, 403, 404, a client's
  429, no provider fits; or /v1/models) is not a provider's: it is counted apart, by status.
- sums from the ledger's hourly rollups (rollup.py); percentiles exact (percentiles.py) for
  windows of up to EXACT_ROWS requests, beyond that the middle of their bucket in the hourly
  latency histograms (within rollup.BUCKET_ERROR, about 1 %): bounded time and memory over
  any window.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from control_plane.ledger.percentiles import (
    ALL,
    BUCKET,
    bucketed_percentiles,
    histogram_of,
    latency_percentiles,
)
from control_plane.ledger.rollup import bucket_middle, window_histogram, window_sums
from control_plane.usage.record import is_error_status

TOTAL = "total"
FORMATS = ("table", "json")
_WINDOW = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ReportError(Exception):
    """A report that cannot be made (bad window or format, no ledger); say it and exit 2."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderStats:
    provider: str
    requests: int
    spend_usd: float
    spend_share: float
    """This provider's fraction (0..1) of the window's spend."""
    cost_per_request_usd: float
    p50_ms: float | None
    """None when there were no requests."""
    p99_ms: float | None
    error_rate: float
    rate_429: float
    estimated: int
    """Requests whose tokens were estimated, not reported."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Unrouted:
    """Requests that never reached a provider."""

    requests: int
    by_status: dict[str, int]
    """HTTP status (as text, for JSON) -> requests."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    since: datetime
    until: datetime
    providers: tuple[ProviderStats, ...]
    """By spend, highest first."""
    total: ProviderStats
    """Every request of the window, routed or not."""
    unrouted: Unrouted


def parse_window(text: str) -> timedelta:
    """"15m", "1h", "24h", "30d" (also seconds: "90s") -> timedelta; ReportError otherwise."""
    match = _WINDOW.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise ReportError(f"invalid window {text!r}: use a positive whole number and a unit "
                          "s, m, h or d, e.g. 15m, 1h, 24h, 30d")
    try:
        return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError:
        raise ReportError(f"window {text!r} is too long: it must start after "
                          f"{_EPOCH:%Y-%m-%d}") from None


def window_start(now: datetime, since: timedelta) -> datetime:
    """now - since; ReportError when that is before the Unix epoch (no ledger row can be)."""
    try:
        start = now - since
    except OverflowError:
        start = None
    if start is None or start < _EPOCH:
        days = (now - _EPOCH).days
        raise ReportError(f"window of {since.days} days starts before {_EPOCH:%Y-%m-%d}: "
                          f"at most {days}d reaches back to the first possible ledger row")
    return start


EXACT_ROWS = 200_000
"""A window of at most this many requests gets exact percentiles (a scan of its rows); a
longer one gets them from the hourly histograms, within rollup.BUCKET_ERROR."""
FRACTIONS = (0.50, 0.99)


def build_report(db_path: str | Path, since: timedelta, now: datetime, *,
                 exact_rows: int = EXACT_ROWS) -> Report:
    """The report over ledger rows with since <= age, i.e. at_unix_ms >= now - since.

    Sums from the hourly rollups (rollup.py) and the rows of the window's first partial hour;
    percentiles exact for windows of at most `exact_rows` requests, else bucketed: memory and
    time stay bounded whatever the window."""
    start = window_start(now, since)
    since_ms = int(start.timestamp() * 1000)
    with read_only(Path(db_path)) as connection:
        try:
            sums = window_sums(connection, since_ms, ("provider", "status"))
            if sum(row[2] for row in sums) <= exact_rows:
                latency = latency_percentiles(connection, since_ms, FRACTIONS, histogram_of(
                    connection.execute(_FINE_HISTOGRAM, (since_ms,))))
            else:
                latency = bucketed_percentiles(histogram_of(window_histogram(
                    connection, since_ms)), FRACTIONS, bucket_middle)
        except sqlite3.Error as error:
            raise ReportError(f"cannot read the usage ledger {db_path}: {error}") from error
    groups = [(provider, status, n, cost, estimated)
              for provider, status, n, cost, estimated, *_ in sums]
    spend_total = math.fsum(cost for _, _, _, cost, _ in groups)
    by_provider: dict[str, list[tuple[int, int, float, int]]] = {}
    for provider, status, count, cost, estimated in groups:
        by_provider.setdefault(provider, []).append((status, count, cost, estimated))
    providers = sorted((_stats(name, rows, latency[name], spend_total)
                        for name, rows in by_provider.items() if name),
                       key=lambda stats: (-stats.spend_usd, stats.provider))
    every = [(status, count, cost, estimated) for _, status, count, cost, estimated in groups]
    unrouted = {str(status): count for status, count, _, _ in sorted(by_provider.get("", []))}
    return Report(since=start, until=now, providers=tuple(providers),
                  total=_stats(TOTAL, every, latency[ALL], spend_total),
                  unrouted=Unrouted(requests=sum(unrouted.values()), by_status=unrouted))


_FINE_HISTOGRAM = (f"SELECT provider, {BUCKET} AS b, count(*) FROM requests "
                   "WHERE at_unix_ms >= ? GROUP BY provider, b")


@contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """The ledger opened read-only; ReportError when it is missing or unreadable."""
    if not path.is_file():
        raise ReportError(f"no usage ledger at {path}")
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as error:
        raise ReportError(f"cannot read the usage ledger {path}: {error}") from error
    try:
        yield connection
    finally:
        connection.close()


def _stats(name: str, rows: list[tuple[int, int, float, int]],
           latency: dict[float, float | None], spend_total: float) -> ProviderStats:
    """One line from (status, requests, spend, estimated) groups."""
    count = sum(requests for _, requests, _, _ in rows)
    spend = math.fsum(cost for _, _, cost, _ in rows)
    return ProviderStats(
        provider=name, requests=count, spend_usd=spend,
        spend_share=spend / spend_total if spend_total else 0.0,
        cost_per_request_usd=spend / count if count else 0.0,
        p50_ms=latency[0.50], p99_ms=latency[0.99],
        error_rate=sum(n for status, n, _, _ in rows if is_error_status(status)) / count
        if count else 0.0,
        rate_429=sum(n for status, n, _, _ in rows if status == 429) / count if count else 0.0,
        estimated=sum(estimated for _, _, _, estimated in rows),
    )


# --- rendering ---------------------------------------------------------------------------

_HEADERS = ("provider", "requests", "spend USD", "share", "USD/request", "p50 ms", "p99 ms",
            "errors", "429s", "estimated")


def _cells(stats: ProviderStats) -> tuple[str, ...]:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    return (stats.provider, str(stats.requests), f"{stats.spend_usd:.6f}",
            f"{stats.spend_share:.1%}", f"{stats.cost_per_request_usd:.8f}", ms(stats.p50_ms),
            ms(stats.p99_ms), f"{stats.error_rate:.1%}", f"{stats.rate_429:.1%}",
            str(stats.estimated))


def render_table(report: Report) -> str:
    """An aligned terminal table: provider left-aligned, numbers right-aligned."""
    rows = [_HEADERS, *(_cells(stats) for stats in report.providers), _cells(report.total)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                         for i, cell in enumerate(row)).rstrip()

    rule = "  ".join("-" * width for width in widths)
    since, until = (moment.astimezone(UTC) for moment in (report.since, report.until))
    title = f"gpu-router usage {since:%Y-%m-%d %H:%M:%S} .. {until:%Y-%m-%d %H:%M:%S} UTC"
    body = [line(row) for row in rows[1:-1]] or ["(no routed requests in this window)"]
    if report.unrouted.requests:
        statuses = ", ".join(f"{n} x {status}" for status, n in report.unrouted.by_status.items())
        body.append(f"not routed (never reached a provider): {report.unrouted.requests} "
                    f"({statuses})")
    footer = ("errors = no response, 429 or 5xx; latency = total, nearest rank; "
              "estimated = tokens estimated from body sizes")
    return "\n".join([title, "", line(rows[0]), rule, *body, rule, line(rows[-1]), "", footer])


def to_json(report: Report) -> dict[str, Any]:
    return {
        "since": report.since.isoformat(),
        "until": report.until.isoformat(),
        "providers": [asdict(stats) for stats in report.providers],
        "total": asdict(report.total),
        "unrouted": asdict(report.unrouted),
    }


def run_report(db_path: str | Path, since_text: str, fmt: str, *,
               now: datetime | None = None) -> str:
    """What `gpu-router report --since <since_text> --format <fmt>` prints (the window
    ends now); ReportError for a bad window or format or a missing ledger."""
    if fmt not in FORMATS:
        raise ReportError(f"unknown format {fmt!r}; one of: {', '.join(FORMATS)}")
    report = build_report(db_path, parse_window(since_text), now or datetime.now(UTC))
    if fmt == "json":
        return json.dumps(to_json(report), indent=2)
    return render_table(report)
