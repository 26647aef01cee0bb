"""The ledger's SQL aggregation: exact percentiles from a histogram, savings sums and pricing,
the health history (sampling, writing, reading back), and memory that does not grow with the
window (report, savings and replay over 10x the rows)."""

from __future__ import annotations

import math
import random
import sqlite3
import sys
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
from replay_reference import ejected_at
from usage_fixtures import make_record

from control_plane.ledger.health_history import (
    HealthRow,
    HistorySampler,
    rows_at,
    snapshot_of,
    stream_rows,
)
from control_plane.ledger.percentiles import ALL, histogram_of, latency_percentiles
from control_plane.ledger.report import build_report
from control_plane.ledger.savings import Served, build_savings, compute_savings, price_tokens
from control_plane.ledger.store import LedgerWriter, ledger_row, open_ledger
from control_plane.policy.load import default_policy_path, load_policy_file
from control_plane.policy.model import Price
from control_plane.policy.wire import to_routing_policy
from control_plane.telemetry.health import FleetHealth
from control_plane.telemetry.samples import RequestSample
from control_plane.usage.normalise import normalise
from ext_proc.health_view import build_health_view
from ext_proc.routing_table import build_routing_table
from ext_proc.scoring import decide
from gpu_router.replay import Decider, replay
from gpu_router.replay_health import Aligned

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from ledger_scale import fill

CONFIG = load_policy_file(default_policy_path())
NOW = datetime.now(UTC)
NOW_MS = int(NOW.timestamp() * 1000)


def nearest_rank(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def test_percentiles_are_exact_nearest_ranks(tmp_path: Path) -> None:
    rng = random.Random(7)
    path = tmp_path / "ledger.db"
    latencies = {"a": [rng.lognormvariate(4, 1) for _ in range(3000)] + [0.0, 0.0],
                 "b": [float(rng.choice((10, 20, 20, 30))) for _ in range(501)], "c": [5.5]}
    writer = LedgerWriter(path)
    for provider, values in latencies.items():
        for index, ms in enumerate(values):
            record = make_record(request_id=f"{provider}{index}", at_unix_ms=NOW_MS - index,
                                 provider=provider, total_ms=ms)
            writer.add(ledger_row(record, normalise(record, "openai"), 0.0))
    writer.close()
    connection = open_ledger(path)
    fractions = (0.01, 0.5, 0.9, 0.99, 1.0)
    counts = connection.execute(
        "SELECT provider, CAST(floor(ln(max(total_ms, 0.001)) * 200) AS INTEGER) AS b, count(*) "
        "FROM requests GROUP BY provider, b").fetchall()
    found = latency_percentiles(connection, 0, fractions, histogram_of(counts))
    every = [ms for values in latencies.values() for ms in values]
    for fraction in fractions:
        assert found[ALL][fraction] == nearest_rank(every, fraction)
        for provider, values in latencies.items():
            assert found[provider][fraction] == nearest_rank(values, fraction), (provider, fraction)
    assert latency_percentiles(connection, 10**12, fractions, {ALL: {}})[ALL][0.5] is None


def test_tokens_of_a_kind_without_a_price_are_billed_at_the_nearest_rate() -> None:
    tokens = (1e6, 2e6, 3e6, 4e6, 5e6)  # input, output, cached, cache write, reasoning
    full = Price(input=1.0, output=2.0, cached_input=0.5, cache_write=1.25, reasoning=3.0)
    assert price_tokens(tokens, full) == pytest.approx(1 + 4 + 1.5 + 5 + 15)
    bare = Price(input=1.0, output=2.0)
    assert price_tokens(tokens, bare) == pytest.approx(1 + 4 + 3 + 4 + 10)


def served(model: str, provider: str, requests: int, input_tokens: float, cost: float,
           failed_over: int = 0) -> Served:
    return Served(model=model, provider=provider, requests=requests,
                  tokens=(input_tokens, input_tokens / 2, 0.0, 0.0, 0.0), cost_usd=cost,
                  failed_over=failed_over, extra_attempts=failed_over)


def test_savings_per_model_per_provider_and_in_total() -> None:
    groups = [served("llama-3.1-8b", "coreweave", 10, 1e6, 0.45),
              served("llama-3.1-8b", "vast", 5, 1e6, 0.09, failed_over=2),
              served("mixtral-8x7b", "lambda", 4, 2e6, 1.8),
              served("retired-model", "lambda", 3, 1e6, 0.3)]
    savings = compute_savings(groups, CONFIG, unrouted=7, since=NOW, until=NOW)
    llama = next(m for m in savings.models if m.model == "llama-3.1-8b")
    tokens = (2e6, 1e6)
    expected = {"lambda": (0.25 * 2 + 0.25) , "coreweave": 0.30 * 2 + 0.30,
                "vast": 0.05 * 2 + 0.08, "runpod": 0.10 * 2 + 0.10}
    assert {b.provider: b.cost_usd for b in llama.baselines} == pytest.approx(expected)
    assert tokens and llama.actual_usd == pytest.approx(0.54) and llama.requests == 15
    assert llama.cheapest.provider == "vast" and llama.most_used.provider == "coreweave"
    assert llama.cheapest.savings_usd == pytest.approx(0.18 - 0.54)
    mixtral = next(m for m in savings.models if m.model == "mixtral-8x7b")
    assert [b.provider for b in mixtral.baselines] == ["runpod", "lambda"], "vast's 24 GB: no"
    vast = next(s for s in savings.providers if s.provider == "vast")
    assert [(u.model, u.requests) for u in vast.uncovered] == [
        ("mixtral-8x7b", 4), ("retired-model", 3)]
    assert vast.covered_requests == 15 and vast.baseline.cost_usd == pytest.approx(0.18)
    assert [u.model for u in savings.unpriced] == ["retired-model"]
    assert savings.vs_cheapest.cost_usd == pytest.approx(0.18 + (0.45 * 2 + 0.45))
    assert (savings.failed_over, savings.extra_attempts, savings.unrouted) == (2, 2, 7)
    assert savings.actual_usd == pytest.approx(0.45 + 0.09 + 1.8 + 0.3)


def test_build_savings_sums_in_sql_what_python_sums_row_by_row(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    writer = LedgerWriter(path)
    rng = random.Random(3)
    for index in range(300):
        provider = rng.choice(("lambda", "coreweave", "runpod", ""))
        record = make_record(request_id=f"r{index}", at_unix_ms=NOW_MS - index * 1000,
                             provider=provider, model="llama-3.1-8b",
                             attempts=rng.choice((1, 1, 2)))
        writer.add(ledger_row(record, normalise(record, "openai"), rng.random() / 1000))
    writer.close()
    savings = build_savings(path, CONFIG, timedelta(hours=1), NOW)
    connection = sqlite3.connect(path)
    connection.row_factory = sqlite3.Row
    rows = connection.execute("SELECT * FROM requests").fetchall()
    routed = [r for r in rows if r["provider"]]
    assert savings.unrouted == len(rows) - len(routed)
    assert savings.actual_usd == pytest.approx(math.fsum(r["cost_usd"] for r in routed))
    assert savings.failed_over == sum(r["attempts"] > 1 for r in routed)
    sheet = {o.model: o.price for p in CONFIG.providers if p.name == "runpod" for o in p.offerings}
    expected = math.fsum(price_tokens(tuple(float(r[f"{k}_tokens"]) for k in (
        "input", "output", "cached_input", "cache_write", "reasoning")), sheet["llama-3.1-8b"])
        for r in routed)
    runpod = next(b for b in savings.models[0].baselines if b.provider == "runpod")
    assert runpod.cost_usd == pytest.approx(expected)


def health(provider: str, model: str, at: int, state: str = "healthy", until: int = 0,
           ewma: float | None = 50.0) -> HealthRow:
    return HealthRow(at_unix_ms=at, provider=provider, model=model, ewma_ms=ewma, ttfb_ms=None,
                     error_rate=0.0, rate_429=0.0, state=state, ejected_until=until, reason="")


def sample(status: int, total_ms: float, at: int) -> RequestSample:
    return RequestSample(provider="vast", model="m", status=status, ttfb_ms=0.0,
                         total_ms=total_ms, at_unix_ms=at, upstream_failure=False, policy="",
                         reason="", node="edge")


def test_history_sampler_writes_every_interval_and_at_each_state_change() -> None:
    fleet = FleetHealth(cooldown_s=10)
    sampler = HistorySampler(interval_s=10)
    fleet.record(sample(200, 40.0, 1000))
    assert {(r.provider, r.model, r.ewma_ms) for r in sampler.due(fleet.entries(1000), 1000)} == {
        ("vast", "", 40.0), ("vast", "m", 40.0)}
    assert sampler.due(fleet.entries(5000), 5000) == [], "nothing new before the interval"
    for at in range(5001, 5006):
        fleet.record(sample(503, 1.0, at))
    ejected = sampler.due(fleet.entries(5006), 5006)
    assert {r.state for r in ejected} == {"ejected"} and ejected[0].ejected_until > 5006
    assert sampler.due(fleet.entries(11_000), 11_000) == [], "still ejected: nothing new"
    assert {r.state for r in sampler.due(fleet.entries(15_006), 15_006)} == {
        "degraded"}, "the cooldown ended: a state change"
    assert sampler.due(fleet.entries(26_000), 26_000) == [], "figures unchanged: no row"
    fleet.record(sample(200, 80.0, 26_001))
    assert {(r.model, r.ewma_ms) for r in sampler.due(fleet.entries(26_002), 26_002)} == {
        ("", 52.0), ("m", 52.0)}, "10 s on and the EWMA moved"
    assert sampler.due(fleet.entries(27_000), 27_000) == [], "moved, but within the interval"
    assert {r.state for r in sampler.due(fleet.entries(100_000), 100_000)} == {"healthy"}
    assert sampler.due(fleet.entries(690_000), 690_000) == [], "an idle fleet writes nothing..."
    assert len(sampler.due(fleet.entries(700_000), 700_000)) == 2, "...but every 10 minutes"


def test_history_is_written_pruned_and_read_back_as_the_snapshot_of_its_time(
        tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    day = 86_400_000
    writer = LedgerWriter(path, retention_days=1, clock=lambda: NOW_MS / 1000)
    for row in (health("vast", "m", NOW_MS - 2 * day), health("vast", "m", NOW_MS - 1000),
                health("vast", "", NOW_MS - 1000, ewma=None),
                health("vast", "m", NOW_MS, state="ejected", until=NOW_MS + 5000)):
        writer.add_health(row)
    writer.close()
    LedgerWriter(path, retention_days=1, clock=lambda: NOW_MS / 1000).close()  # prunes at open
    connection = open_ledger(path)
    assert [r.at_unix_ms for r in stream_rows(connection, 0, NOW_MS)] == [
        NOW_MS - 1000, NOW_MS - 1000, NOW_MS], "the row older than the retention is gone"
    before = rows_at(connection, NOW_MS - 1)
    assert {(r.model, r.state) for r in before} == {("m", "healthy"), ("", "healthy")}
    view = build_health_view(snapshot_of(rows_at(connection, NOW_MS), NOW_MS))
    assert view.latency_ms("vast", "m") == 50.0
    assert view.ejected_until("vast", "m") == NOW_MS + 5000
    wide = build_health_view(snapshot_of([health("vast", "", 0, ewma=None)], 0))
    assert wide.latency_ms("vast", "x") is None, "unmeasured stays unmeasured"


def test_the_decider_picks_what_decide_picks() -> None:
    table = build_routing_table(to_routing_policy(CONFIG))
    rng = random.Random(11)
    decider = Decider()
    for trial in range(3000):
        if trial % 50 == 0:  # a new health version: every model's candidates anew
            aligned_by_model = {}
            for name, route in table.models.items():
                rows = [health(p, name, 0, state=rng.choice(("healthy", "degraded")),
                               ewma=rng.choice((None, rng.uniform(10, 300))))
                        for p in route.providers]
                aligned_by_model[name] = build_health_view(snapshot_of(rows, 0)).align(route)
        route = table.models[rng.choice(("llama-3.1-8b", "mixtral-8x7b", "llama-3.1-70b"))]
        rule = rng.choice(table.policies)
        aligned = aligned_by_model[route.name]
        prompt, wanted = rng.randrange(0, 3000), rng.choice((0, 16, 256, rng.randrange(4000)))
        expected = decide(route, aligned, rule, strategy=rule.strategy, prompt_tokens=prompt,
                          max_tokens=wanted, now_unix_ms=0).provider
        plain = Aligned.of(aligned)
        index = decider.choice(route, plain, rule, prompt, wanted, ejected_at(plain, 0), 0)
        assert route.providers[index] == expected, (trial, route.name, rule.name)
    assert decider.calls < 3000, "equal keys under equivalent health are decided once"


def peak_bytes(call: object) -> int:
    tracemalloc.start()
    try:
        call()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_report_savings_and_replay_memory_does_not_grow_with_the_window(tmp_path: Path) -> None:
    now_ms = int(time.time() * 1000)
    peaks = {}
    for rows in (20_000, 200_000):
        path = tmp_path / f"ledger-{rows}.db"
        fill(path, rows, now_ms, days=1)
        peaks[rows] = {
            "report": peak_bytes(partial(build_report, path, timedelta(days=30), NOW)),
            "savings": peak_bytes(partial(build_savings, path, CONFIG, timedelta(days=30), NOW)),
            "replay": peak_bytes(partial(replay, path, CONFIG, now_ms - 30 * 86_400_000, now_ms)),
        }
    for command in ("report", "savings"):
        small, large = peaks[20_000][command], peaks[200_000][command]
        assert large < 2 * small + 2_000_000, (command, small, large)
    assert peaks[200_000]["replay"] < Decider.MEMO * 1000 + 2 * peaks[20_000]["replay"], (
        "replay holds its aggregates and a bounded memo, never the rows")
