"""Prometheus metrics for the control plane's /metrics, and the dashboard's recent history.

Counters and histograms in a prometheus_client registry of each `Metrics` (not the global
one, so tests can make several), exposed as text 0.0.4 or OpenMetrics by prometheus_client's
own content negotiation; their values are plain Python numbers until a scrape
(metric_families.py).
`Metrics.observe` takes one finished request and updates every series below; it also keeps,
for the dashboard, a bounded time series (per provider, per 10 s bucket, the last 360 buckets
= 1 hour) and the last 50 decisions. Everything is guarded by one lock, so any thread may
observe or render.

Metric names (deploy/grafana/gpu-router.json reads them):
  gpu_router_requests_total{provider,model,status_class}   status_class 2xx..5xx, "none"
  gpu_router_request_errors_total{provider,model}          no response, 429 or 5xx
  gpu_router_rate_limited_total{provider,model}            status 429
  gpu_router_failovers_total{provider,model}               served after more than 1 attempt
  gpu_router_request_duration_seconds{provider,model}      histogram, total latency
  gpu_router_time_to_first_byte_seconds{provider,model}    histogram
  gpu_router_tokens_total{provider,model,kind}             kind input|output|cached_input|
                                                           cache_write|reasoning
  gpu_router_estimated_usage_total{provider,model}         requests with estimated tokens
  gpu_router_cost_usd_total{provider,model}
  gpu_router_decisions_total{policy,strategy,reason}       reason: its first words only
  gpu_router_ledger_rows_dropped_total                     ledger rows lost after every retry
  gpu_router_reconciled_requests_total{node}               requests booked from an edge's
                                                           durable log: the ledger lacked them
                                                           (ALS entry or unwritten batch lost)
  gpu_router_telemetry_dropped_total{kind,reason}          access-log entries (kind attempt|edge)
                                                           and load reports not believed
                                                           (telemetry/validation.py)
  gpu_router_telemetry_repaired_total{kind,reason}         kept after a repair: invalid UTF-8
                                                           replaced, Retry-After capped
A request nobody served has provider="none".
"""

from __future__ import annotations

import bisect
import functools
import math
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import prometheus_client
from prometheus_client.exposition import choose_encoder

from control_plane.metric_families import Counter, Histogram
from control_plane.usage.normalise import Usage
from control_plane.usage.record import RequestRecord, is_error_status

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
EXT_PROC_BUCKETS_S = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
SERIES_BUCKET_S = 10
SERIES_BUCKETS = 360
RECENT_DECISIONS = 50
NO_PROVIDER = "none"
_REASON_WORDS = 3
_WORD_END = re.compile(r"[:;,.]$")

TOKEN_KINDS = ("input", "output", "cached_input", "cache_write", "reasoning")


@dataclass(frozen=True, slots=True)
class _ServedBy:
    """The children every request served by one (provider, model) updates: one lookup."""

    duration: Any
    ttfb: Any
    cost: Any
    tokens: tuple[Any, ...]
    """In TOKEN_KINDS order."""


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "none"


_WORDS_BEFORE_A_DIGIT = re.compile(r"\s*(?:[^\s\d]+(?:\s+|$))*")
"""The reason's leading words that hold no digit: all its bucket can depend on (a word with a
digit ends it), and the same across requests, whose reasons carry their own prices."""


def reason_bucket(reason: str) -> str:
    """The reason's first words ("cheapest within 2000 ms SLA: $0.00003" -> "cheapest within"),
    so the decisions label has few values: numbers, symbols and what follows are dropped."""
    return _bucket(_WORDS_BEFORE_A_DIGIT.match(reason).group())  # type: ignore[union-attr]


@functools.lru_cache(maxsize=1024)
def _bucket(reason: str) -> str:
    """reason_bucket's rule, cached on the part of a reason it reads."""
    words: list[str] = []
    for word in reason.lower().split():
        if len(words) == _REASON_WORDS or not word[0].isalpha() or any(c.isdigit() for c in word):
            break
        words.append(_WORD_END.sub("", word))
        if _WORD_END.search(word):
            break
    return " ".join(words) or "none"


# --- dashboard history ----------------------------------------------------------------------

_SKETCH_BOUNDS_MS = tuple(1.1 ** i for i in range(140))
"""Latency sketch bins: 1 ms .. ~10 min, each 10% wider, so a percentile read from
the bins is within 10% of the true value while a bucket's memory stays fixed."""


@dataclass(slots=True)
class _Sketch:
    counts: list[int] = field(default_factory=lambda: [0] * (len(_SKETCH_BOUNDS_MS) + 1))
    total: int = 0

    def add(self, value_ms: float) -> None:
        self.counts[bisect.bisect_left(_SKETCH_BOUNDS_MS, value_ms)] += 1
        self.total += 1

    def percentile(self, fraction: float) -> float | None:
        """The upper bound of the bin holding the nearest-rank percentile."""
        if not self.total:
            return None
        rank = max(math.ceil(fraction * self.total), 1)
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return _SKETCH_BOUNDS_MS[min(index, len(_SKETCH_BOUNDS_MS) - 1)]
        return _SKETCH_BOUNDS_MS[-1]


@dataclass(slots=True)
class _Bucket:
    requests: int = 0
    errors: int = 0
    cost_usd: float = 0.0
    ttfb: _Sketch = field(default_factory=_Sketch)
    total: _Sketch = field(default_factory=_Sketch)


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesPoint:
    """One provider's requests in one 10 s bucket."""

    start_unix_ms: int
    requests: int
    errors: int
    cost_usd: float
    ttfb_p50_ms: float | None
    ttfb_p99_ms: float | None
    total_p50_ms: float | None
    total_p99_ms: float | None


class Metrics:
    """The registry plus dashboard history; `observe` once per finished request."""

    def __init__(self) -> None:
        pm = ("provider", "model")
        self.requests = Counter("gpu_router_requests_total",
                                "Requests by serving provider, model and status class.",
                                (*pm, "status_class"))
        self.errors = Counter("gpu_router_request_errors_total",
                              "Requests that got no response, a 429 or a 5xx.", pm)
        self.rate_limited = Counter("gpu_router_rate_limited_total",
                                    "Requests answered 429.", pm)
        self.failovers = Counter("gpu_router_failovers_total",
                                 "Requests served after more than one attempt.", pm)
        self.duration = Histogram("gpu_router_request_duration_seconds",
                                  "Total request latency as Envoy measured it.", pm,
                                  LATENCY_BUCKETS_S)
        self.ttfb = Histogram("gpu_router_time_to_first_byte_seconds",
                              "Time to the first upstream response byte.", pm, LATENCY_BUCKETS_S)
        self.tokens = Counter("gpu_router_tokens_total",
                              "Normalised tokens by kind (reported or estimated).",
                              (*pm, "kind"))
        self.estimated = Counter("gpu_router_estimated_usage_total",
                                 "Requests whose tokens were estimated from body sizes.", pm)
        self.cost = Counter("gpu_router_cost_usd_total",
                            "Spend in USD from normalised tokens and the price sheet.", pm)
        self.decisions = Counter("gpu_router_decisions_total",
                                 "Routing decisions by policy, strategy and reason (first words).",
                                 ("policy", "strategy", "reason"))
        self.ext_proc = Histogram("gpu_router_ext_proc_duration_seconds",
                                  "ext_proc's time per request, as Envoy's ext_proc filter "
                                  "measured it (Envoy has no ext_proc timing stat).",
                                  (), EXT_PROC_BUCKETS_S)
        self.ledger_dropped = Counter("gpu_router_ledger_rows_dropped_total",
                                      "Ledger rows lost because every retry of their batch "
                                      "failed (each drop is also logged).", ())
        self.reconciled = Counter("gpu_router_reconciled_requests_total",
                                  "Requests booked from an edge's durable request log because "
                                  "the ledger lacked them (their gRPC access-log entry, or the "
                                  "batch holding their row, was lost).", ("node",))
        self.client_requests = Counter("gpu_router_client_requests_total",
                                       "Requests by client (the policy's clients, by key) and "
                                       "status class.", ("client", "status_class"))
        self.client_errors = Counter("gpu_router_client_errors_total",
                                     "Requests of a client that got no response, a 429 or a 5xx "
                                     "(its own budget and rate-limit refusals included).",
                                     ("client",))
        self.client_tokens = Counter("gpu_router_client_tokens_total",
                                     "Normalised tokens by client and kind.", ("client", "kind"))
        self.client_cost = Counter("gpu_router_client_cost_usd_total",
                                   "Spend in USD by client.", ("client",))
        self.telemetry_dropped = Counter("gpu_router_telemetry_dropped_total",
                                         "Access-log entries and load reports dropped as not "
                                         "believable, by kind and reason.", ("kind", "reason"))
        self.telemetry_repaired = Counter("gpu_router_telemetry_repaired_total",
                                          "Access-log entries and load reports kept after a "
                                          "repair, by kind and reason.", ("kind", "reason"))
        self._registry: tuple[Counter | Histogram, ...] = (
            self.requests, self.errors, self.rate_limited, self.failovers, self.duration,
            self.ttfb, self.tokens, self.estimated, self.cost, self.decisions, self.ext_proc,
            self.ledger_dropped, self.reconciled, self.client_requests, self.client_errors,
            self.client_tokens, self.client_cost, self.telemetry_dropped, self.telemetry_repaired)
        self._exposed = prometheus_client.CollectorRegistry()
        for family in self._registry:
            self._exposed.register(family)
        self._served: dict[tuple[str, str], _ServedBy] = {}
        self._lock = threading.Lock()
        self._buckets: dict[int, dict[str, _Bucket]] = {}
        self._decisions: deque[tuple[RequestRecord, float]] = deque(maxlen=RECENT_DECISIONS)
        """(record, cost) of the last requests: the dashboard's dicts are built when it reads."""

    def observe(self, record: RequestRecord, usage: Usage, cost_usd: float) -> None:
        provider = record.provider or NO_PROVIDER
        pm = (provider, record.model)
        error = is_error_status(record.status)
        with self._lock:
            served = self._served_by(pm)
            self.requests.inc((*pm, status_class(record.status)))
            if error:
                self.errors.inc(pm)
            if record.status == 429:
                self.rate_limited.inc(pm)
            if record.attempts > 1:
                self.failovers.inc(pm)
            served.duration.observe(record.total_ms / 1000)
            served.ttfb.observe(record.ttfb_ms / 1000)
            for child, count in zip(served.tokens, (
                    usage.input_tokens, usage.output_tokens, usage.cached_input_tokens,
                    usage.cache_write_tokens, usage.reasoning_tokens), strict=True):
                if count:
                    child.inc(count)
            if usage.estimated:
                self.estimated.inc(pm)
            served.cost.inc(cost_usd)
            self.decisions.inc((record.policy, record.strategy, reason_bucket(record.reason)))
            if record.ext_proc_us:
                self.ext_proc.observe((), record.ext_proc_us / 1e6)
            if record.client:
                self.client_requests.inc((record.client, status_class(record.status)))
                if error:
                    self.client_errors.inc((record.client,))
                self.client_tokens.inc((record.client, "input"), usage.input_tokens)
                self.client_tokens.inc((record.client, "output"), usage.output_tokens)
                self.client_cost.inc((record.client,), cost_usd)
            self._record_history(record, provider, error, cost_usd)

    def _served_by(self, pm: tuple[str, str]) -> _ServedBy:
        """Every token kind's series exists (at 0) from a pair's first request, as before."""
        served = self._served.get(pm)
        if served is None:
            served = _ServedBy(self.duration.child(pm), self.ttfb.child(pm), self.cost.child(pm),
                               tuple(self.tokens.child((*pm, kind)) for kind in TOKEN_KINDS))
            self._served[pm] = served
        return served

    def count_dropped_rows(self, rows: int) -> None:
        """Any thread (the ledger's writer calls it)."""
        with self._lock:
            self.ledger_dropped.inc((), rows)

    def count_reconciled(self, node: str, requests: int) -> None:
        with self._lock:
            self.reconciled.inc((node,), requests)

    def count_telemetry(self, kind: str, reason: str, *, dropped: bool = True) -> None:
        """One telemetry item dropped or repaired (telemetry/validation.py); any thread."""
        with self._lock:
            (self.telemetry_dropped if dropped else self.telemetry_repaired).inc((kind, reason))

    def _record_history(self, record: RequestRecord, provider: str, error: bool,
                        cost_usd: float) -> None:
        self._decisions.append((record, cost_usd))
        index = record.at_unix_ms // (SERIES_BUCKET_S * 1000)
        if index not in self._buckets:
            if self._buckets and index <= max(self._buckets) - SERIES_BUCKETS:
                return
            self._buckets[index] = {}
            for old in [i for i in self._buckets if i <= index - SERIES_BUCKETS]:
                del self._buckets[old]
        bucket = self._buckets[index].setdefault(provider, _Bucket())
        bucket.requests += 1
        bucket.errors += error
        bucket.cost_usd += cost_usd
        bucket.ttfb.add(record.ttfb_ms)
        bucket.total.add(record.total_ms)

    def render(self) -> str:
        """The text exposition format 0.0.4 (what a scrape without an Accept header gets)."""
        return self.exposition("")[0].decode()

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """(body, content type) answering a scrape's Accept header: OpenMetrics when the
        scraper asks for it, else text 0.0.4 (prometheus_client's negotiation). Under the lock,
        so a scrape never sees half of one request's updates."""
        encoder, content_type = choose_encoder(accept)
        with self._lock:
            return encoder(self._exposed), content_type

    def series(self, since_unix_ms: int) -> dict[str, list[SeriesPoint]]:
        """Provider -> its 10 s buckets starting at or after `since_unix_ms`, oldest first."""
        out: dict[str, list[SeriesPoint]] = {}
        size_ms = SERIES_BUCKET_S * 1000
        with self._lock:
            for index in sorted(self._buckets):
                if (index + 1) * size_ms <= since_unix_ms:
                    continue
                for provider, bucket in self._buckets[index].items():
                    out.setdefault(provider, []).append(SeriesPoint(
                        start_unix_ms=index * size_ms, requests=bucket.requests,
                        errors=bucket.errors, cost_usd=bucket.cost_usd,
                        ttfb_p50_ms=bucket.ttfb.percentile(0.5),
                        ttfb_p99_ms=bucket.ttfb.percentile(0.99),
                        total_p50_ms=bucket.total.percentile(0.5),
                        total_p99_ms=bucket.total.percentile(0.99)))
        return out

    def recent_decisions(self) -> list[dict[str, Any]]:
        """The last 50 requests' decisions and outcomes, newest first."""
        with self._lock:
            recent = list(reversed(self._decisions))
        return [{
            "at_unix_ms": record.at_unix_ms, "request_id": record.request_id,
            "model": record.model, "policy": record.policy, "strategy": record.strategy,
            "reason": record.reason, "fallbacks": list(record.fallbacks),
            "provider": record.provider, "attempts": record.attempts, "status": record.status,
            "ttfb_ms": record.ttfb_ms, "total_ms": record.total_ms, "cost_usd": cost_usd,
        } for record, cost_usd in recent]
