"""Prometheus exposition (parsed back), label escaping, reason buckets, dashboard history."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from usage_fixtures import make_record

from control_plane.metrics import (
    LATENCY_BUCKETS_S,
    RECENT_DECISIONS,
    SERIES_BUCKET_S,
    SERIES_BUCKETS,
    Metrics,
    _bucket,
    reason_bucket,
    status_class,
)
from control_plane.usage.normalise import Usage, normalise

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def parse_exposition(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset[tuple[str,
                                                                                        str]]],
                                                               float]]:
    """(metric name -> TYPE, (sample name, labels) -> value); fails on any malformed line."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    helped: set[str] = set()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split(" ", 3)[2])
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in helped, f"HELP before TYPE for {name}"
            types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, f"malformed sample line {line!r}"
        name, _, label_text, value = match.groups()
        labels: list[tuple[str, str]] = []
        rest = label_text or ""
        while rest:
            label = _LABEL.match(rest)
            assert label, f"malformed labels in {line!r}"
            labels.append((label.group(1), _unescape(label.group(2))))
            rest = rest[label.end():]
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample {name} before its TYPE"
        samples[(name, frozenset(labels))] = float(value.replace("+Inf", "inf"))
    return types, samples


def L(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def observe_mix(metrics: Metrics) -> None:
    ok = make_record(usage_text='"usage":{"prompt_tokens":100,"completion_tokens":20,'
                                '"prompt_tokens_details":{"cached_tokens":40}}')
    metrics.observe(ok, normalise(ok, "openai"), 0.25)
    metrics.observe(ok, normalise(ok, "openai"), 0.25)
    limited = make_record(provider="runpod", status=429, total_ms=4.0, ttfb_ms=4.0,
                          reason="cheapest within 2000 ms SLA: $0.0001")
    metrics.observe(limited, normalise(limited, "openai"), 0.0)
    failed_over = make_record(provider="lambda", attempts=2, status=200, total_ms=2500.0)
    metrics.observe(failed_over, normalise(failed_over, "openai"), 0.125)
    nobody = make_record(provider="", status=503, reason="no provider serves it", total_ms=1.0)
    metrics.observe(nobody, normalise(nobody, "openai"), 0.0)


def test_exposition_parses_back_with_the_right_values() -> None:
    metrics = Metrics()
    observe_mix(metrics)
    types, samples = parse_exposition(metrics.render())
    assert types["gpu_router_requests_total"] == "counter"
    assert types["gpu_router_request_duration_seconds"] == "histogram"
    m = "llama-3.1-8b"
    assert samples[("gpu_router_requests_total",
                    L(provider="coreweave", model=m, status_class="2xx"))] == 2
    assert samples[("gpu_router_requests_total",
                    L(provider="none", model=m, status_class="5xx"))] == 1
    assert samples[("gpu_router_request_errors_total", L(provider="runpod", model=m))] == 1
    assert samples[("gpu_router_request_errors_total", L(provider="none", model=m))] == 1
    assert samples[("gpu_router_rate_limited_total", L(provider="runpod", model=m))] == 1
    assert samples[("gpu_router_failovers_total", L(provider="lambda", model=m))] == 1
    assert samples[("gpu_router_tokens_total",
                    L(provider="coreweave", model=m, kind="cached_input"))] == 80
    assert samples[("gpu_router_tokens_total",
                    L(provider="coreweave", model=m, kind="input"))] == 120
    assert samples[("gpu_router_cost_usd_total", L(provider="coreweave", model=m))] == 0.5
    assert samples[("gpu_router_estimated_usage_total", L(provider="lambda", model=m))] == 1
    assert samples[("gpu_router_decisions_total",
                    L(policy="interactive", strategy="latency", reason="fastest"))] == 3
    assert samples[("gpu_router_decisions_total",
                    L(policy="interactive", strategy="latency", reason="cheapest within"))] == 1


def test_histograms_are_cumulative_with_sum_and_count() -> None:
    metrics = Metrics()
    observe_mix(metrics)
    _, samples = parse_exposition(metrics.render())
    labels = {"provider": "lambda", "model": "llama-3.1-8b"}
    buckets = sorted((float(dict(key)["le"]), value) for (name, key), value in samples.items()
                     if name == "gpu_router_request_duration_seconds_bucket"
                     and dict(key).items() >= labels.items())
    assert [le for le, _ in buckets] == [*LATENCY_BUCKETS_S, math.inf]
    assert [count for le, count in buckets] == [0.0 if le < 2.5 else 1.0 for le, _ in buckets]
    assert samples[("gpu_router_request_duration_seconds_sum", L(**labels))] == 2.5
    assert samples[("gpu_router_request_duration_seconds_count", L(**labels))] == 1
    coreweave = {"provider": "coreweave", "model": "llama-3.1-8b"}
    assert samples[("gpu_router_time_to_first_byte_seconds_count", L(**coreweave))] == 2


def test_label_values_and_help_are_escaped() -> None:
    metrics = Metrics()
    odd = make_record(model='we"ird\\model\nx', policy="p")
    metrics.observe(odd, normalise(odd, "openai"), 0.0)
    text = metrics.render()
    assert 'model="we\\"ird\\\\model\\nx"' in text
    _, samples = parse_exposition(text)
    assert ("gpu_router_requests_total",
            L(provider="coreweave", model='we"ird\\model\nx', status_class="2xx")) in samples


def test_empty_registry_still_declares_every_metric() -> None:
    types, samples = parse_exposition(Metrics().render())
    assert len(types) == 19  # the two telemetry counters included
    assert {name for name, _ in samples} == {  # only the metrics without labels, at 0
        "gpu_router_ledger_rows_dropped_total",
        *(f"gpu_router_ext_proc_duration_seconds_{part}" for part in ("bucket", "sum", "count"))}
    assert set(samples.values()) == {0.0}


def test_registries_are_per_instance() -> None:
    one, two = Metrics(), Metrics()
    one.count_reconciled("edge-1", 2)
    assert one.reconciled.value(("edge-1",)) == 2
    assert two.reconciled.value(("edge-1",)) == 0
    assert "edge-1" not in two.render()


def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    metrics = Metrics()
    observe_mix(metrics)
    body, content_type = metrics.exposition(
        "application/openmetrics-text;version=1.0.0;q=0.6,text/plain;version=0.0.4;q=0.3")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    assert "# TYPE gpu_router_requests counter" in text
    assert ('gpu_router_requests_total{model="llama-3.1-8b",provider="runpod",'
            'status_class="4xx"} 1.0') in text
    body, content_type = metrics.exposition("*/*")
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert body.decode() == metrics.render()


def test_dropped_ledger_rows_and_reconciled_requests_are_counted() -> None:
    metrics = Metrics()
    metrics.count_dropped_rows(3)
    metrics.count_dropped_rows(2)
    metrics.count_reconciled("edge-1", 4)
    _, samples = parse_exposition(metrics.render())
    assert samples[("gpu_router_ledger_rows_dropped_total", frozenset())] == 5
    assert samples[("gpu_router_reconciled_requests_total", L(node="edge-1"))] == 4


def test_ext_proc_time_from_envoys_filter_state_is_a_histogram() -> None:
    metrics = Metrics()
    timed = make_record(ext_proc_us=400)
    metrics.observe(timed, normalise(timed, "openai"), 0.0)
    _, samples = parse_exposition(metrics.render())
    assert samples[("gpu_router_ext_proc_duration_seconds_count", L())] == 1
    assert samples[("gpu_router_ext_proc_duration_seconds_bucket", L(le="0.0005"))] == 1
    assert samples[("gpu_router_ext_proc_duration_seconds_bucket", L(le="0.0002"))] == 0


@pytest.mark.parametrize(("reason", "bucket"), [
    ("cheapest within 2000 ms SLA: $0.000034", "cheapest within"),
    ("fastest: 42 ms EWMA", "fastest"),
    ("unmeasured: exploring", "unmeasured"),
    ("no provider within 2000 ms SLA; fastest", "no provider within"),
    ("balanced score 1.23 (degraded)", "balanced score"),
    ("", "none"),
    ("$$$", "none"),
])
def test_reason_buckets_keep_only_the_first_words(reason: str, bucket: str) -> None:
    assert reason_bucket(reason) == bucket


@pytest.mark.parametrize(("status", "cls"), [(200, "2xx"), (429, "4xx"), (503, "5xx"),
                                             (0, "none"), (999, "none")])
def test_status_class(status: int, cls: str) -> None:
    assert status_class(status) == cls


def usage() -> Usage:
    return Usage(input_tokens=1, output_tokens=1, cached_input_tokens=0, cache_write_tokens=0,
                 reasoning_tokens=0, estimated=False)


def test_time_series_buckets_and_percentiles() -> None:
    metrics = Metrics()
    start = 1_700_000_000_000 - 1_700_000_000_000 % (SERIES_BUCKET_S * 1000)
    for index in range(100):
        record = make_record(at_unix_ms=start + index, ttfb_ms=10.0, total_ms=float(index + 1),
                             status=500 if index < 5 else 200)
        metrics.observe(record, usage(), 0.01)
    later = make_record(at_unix_ms=start + SERIES_BUCKET_S * 1000, provider="vast")
    metrics.observe(later, usage(), 0.02)
    series = metrics.series(0)
    (point,) = series["coreweave"]
    assert (point.start_unix_ms, point.requests, point.errors) == (start, 100, 5)
    assert point.cost_usd == pytest.approx(1.0)
    assert point.total_p50_ms is not None and 50 <= point.total_p50_ms <= 50 * 1.1
    assert point.total_p99_ms is not None and 99 <= point.total_p99_ms <= 99 * 1.1
    assert point.ttfb_p50_ms is not None and 10 <= point.ttfb_p50_ms <= 11
    assert [p.start_unix_ms for p in series["vast"]] == [start + SERIES_BUCKET_S * 1000]
    assert metrics.series(start + SERIES_BUCKET_S * 1000).keys() == {"vast"}


def test_history_is_bounded() -> None:
    metrics = Metrics()
    size_ms = SERIES_BUCKET_S * 1000
    for index in range(SERIES_BUCKETS + 40):
        metrics.observe(make_record(at_unix_ms=index * size_ms, request_id=f"r{index}"),
                        usage(), 0.0)
    points = metrics.series(0)["coreweave"]
    assert len(points) == SERIES_BUCKETS
    assert points[0].start_unix_ms == 40 * size_ms
    late = make_record(at_unix_ms=0, request_id="late")
    metrics.observe(late, usage(), 0.0)
    assert len(metrics.series(0)["coreweave"]) == SERIES_BUCKETS, "too old: not re-added"
    decisions = metrics.recent_decisions()
    assert len(decisions) == RECENT_DECISIONS
    assert [d["request_id"] for d in decisions[:2]] == ["late", f"r{SERIES_BUCKETS + 39}"]


def test_grafana_dashboard_reads_only_metrics_we_export() -> None:
    dashboard = json.loads((Path(__file__).parents[1] / "deploy/grafana/gpu-router.json")
                           .read_text(encoding="utf-8"))
    types, _ = parse_exposition(Metrics().render())
    exported = set(types) | {f"{name}_bucket" for name, kind in types.items()
                             if kind == "histogram"}
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bgpu_router_\w+", expr)}
    assert used and used <= exported, used - exported
    assert {"gpu_router_cost_usd_total", "gpu_router_request_errors_total",
            "gpu_router_request_duration_seconds_bucket"} <= used


@given(st.text(alphabet="ab $:.,1 -()xyZ\t\n", max_size=40))
def test_a_reason_is_bucketed_by_the_words_before_its_first_digit(reason: str) -> None:
    """The cache keys on that part (a reason carries its request's price, so whole reasons
    never repeat); the bucket is the same as the rule's over the whole reason."""
    assert reason_bucket(reason) == _bucket.__wrapped__(reason)


def test_reasons_differing_only_in_their_price_share_one_cached_bucket() -> None:
    _bucket.cache_clear()
    for price in ("0.000034", "0.000035", "0.000123"):
        assert reason_bucket(f"cheapest within 2000 ms SLA: ${price}") == "cheapest within"
    assert _bucket.cache_info().misses == 1
