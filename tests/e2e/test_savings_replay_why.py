"""Savings, replay and why over a ledger written by the real stack (default policy, simulated
providers with different prices): savings against totals computed here row by row from the
ledger's tokens and the price sheets; replay of the same policy changes no decision and a
cost-first policy lowers the cost; why tells a failed-over request's every candidate and attempt,
the failed one with the status the simulator answered.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from polling import eventually
from stack_harness import Providers, chat, policy_on_free_ports

from control_plane.ledger.health_history import rows_at
from control_plane.ledger.report import run_report
from control_plane.ledger.savings import build_savings
from control_plane.ledger.why import explain
from control_plane.policy.load import default_policy_path, load_policy_file
from gpu_router import cli
from gpu_router.replay import replay
from gpu_router.stack import Stack, StackPorts

MODELS = ("llama-3.1-8b", "mixtral-8x7b", "llama-3.1-70b")
KINDS = ("input", "output", "cached_input", "cache_write", "reasoning")
FALLBACK_RATE = {"cached_input": "input", "cache_write": "input", "reasoning": "output"}
WINDOW = 8
"""Requests per model in the replayed window."""


def rows(stack: Stack, where: str = "1", *args: object) -> list[sqlite3.Row]:
    connection = sqlite3.connect(stack.log_dir / "ledger.db")
    connection.row_factory = sqlite3.Row
    try:
        return connection.execute(f"SELECT * FROM requests WHERE {where}", args).fetchall()
    finally:
        connection.close()


def history_caught_up(stack: Stack) -> bool:
    """The health history's latest rows hold the fleet's current EWMAs (what ext_proc routes
    on), every offering of the warm-up measured."""
    fleet = json.loads(stack.control_get("/v1/health")[1])["providers"]
    current = {(provider, model): figures["ewma_latency_ms"]
               for provider, entry in fleet.items()
               for model, figures in [("", entry), *entry["models"].items()]}
    connection = sqlite3.connect(stack.log_dir / "ledger.db")
    try:
        recorded = {(row.provider, row.model): row.ewma_ms
                    for row in rows_at(connection, int(time.time() * 1000) + 1)}
    finally:
        connection.close()
    measured = sum(model != "" and ewma is not None for (_, model), ewma in current.items())
    return measured >= 6 and recorded == current  # llama-8b x 4; mixtral's, 70b's first picks


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("savings")
    policy = policy_on_free_ports(default_policy_path(), root / "policy.yaml")
    accounting = ["--ledger", str(root / "ledger.db"), "--audit-log", str(root / "audit.jsonl"),
                  "--health-history-interval-s", "1"]
    running = Stack(policy=policy, log_dir=root, ports=StackPorts.free(),
                    accounting=accounting).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> dict[str, int]:
    """Warm-up (each provider measured), a window of latency-first traffic, then one request
    that fails over and one that never reaches a provider. Returns the window's bounds."""
    sims = Providers(stack.policy)
    sims.reset_all()
    for _ in range(6):
        for model in MODELS:
            assert chat(stack, model)[0] == 200
    eventually(lambda: history_caught_up(stack), "health history after the warm-up", timeout=30)
    start_ms = int(time.time() * 1000)
    for index in range(WINDOW):
        for model in MODELS:
            status, _, body = chat(stack, model, {"x-request-id": f"w-{model}-{index}"},
                                   max_tokens=16 + index)
            assert status == 200, body
    end_ms = int(time.time() * 1000) + 1
    eventually(lambda: history_caught_up(stack), "health history after the window", timeout=30)
    sims.fault("coreweave", mode="error", status=503, rate=1.0)
    status, _, body = chat(stack, "llama-3.1-8b", {"x-request-id": "failed-over"})
    sims.reset_all()
    assert status == 200, body
    assert chat(stack, "no-such-model", {"x-request-id": "unrouted"})[0] == 404
    eventually(lambda: len(rows(stack, "client_request_id IN ('failed-over', 'unrouted')")) == 2,
               "the last requests booked")
    return {"start_ms": start_ms, "end_ms": end_ms}


def price_of(sheet: dict[str, float], kind: str) -> float:
    return sheet.get(kind, sheet.get(FALLBACK_RATE.get(kind, kind), 0.0))


def test_savings_match_the_ledger_tokens_at_each_price_sheet(stack: Stack, traffic: dict) -> None:
    document = yaml.safe_load(stack.policy.read_text())
    sheets = {(m["name"], p["name"]): m["price"] for p in document["providers"]
              for m in p["models"] if p["name"] != "vast" or m["name"] != "mixtral-8x7b"}
    routed = rows(stack, "provider != ''")
    actual: dict[str, float] = {}
    would: dict[tuple[str, str], float] = {}
    for row in routed:
        actual[row["model"]] = actual.get(row["model"], 0.0) + row["cost_usd"]
        for (model, provider), sheet in sheets.items():
            if model == row["model"]:
                would[model, provider] = would.get((model, provider), 0.0) + sum(
                    row[f"{kind}_tokens"] * price_of(sheet, kind) for kind in KINDS) / 1e6

    savings = build_savings(stack.log_dir / "ledger.db", load_policy_file(stack.policy),
                            timedelta(hours=1), datetime.now(UTC))

    unrouted = rows(stack, "provider = ''")
    assert sum(row["status"] == 404 for row in unrouted) == 1, "the unknown model"
    assert savings.unrouted == len(unrouted) and savings.requests == len(routed)
    assert savings.failed_over == 1 and savings.extra_attempts == 1
    assert savings.actual_usd == pytest.approx(sum(actual.values()))
    for model in savings.models:
        assert model.actual_usd == pytest.approx(actual[model.model])
        expected = {p: would[m, p] for m, p in would if m == model.model}
        assert {b.provider: b.cost_usd for b in model.baselines} == pytest.approx(expected)
        cheapest = min(expected, key=expected.__getitem__)
        assert model.cheapest is not None and model.cheapest.provider == cheapest
        assert model.cheapest.savings_usd == pytest.approx(expected[cheapest] - actual[model.model])
    assert "mixtral-8x7b" not in {b.provider for m in savings.models for b in m.baselines}
    vast = next(s for s in savings.providers if s.provider == "vast")
    assert {u.model for u in vast.uncovered} == {"mixtral-8x7b", "llama-3.1-70b"}, (
        "vast's 24 GB cannot hold mixtral and it offers no 70b: listed apart, not priced at 0")
    assert vast.baseline.cost_usd == pytest.approx(would["llama-3.1-8b", "vast"])
    assert savings.vs_cheapest is not None and savings.vs_cheapest.cost_usd == pytest.approx(
        sum(min(c for (m, _), c in would.items() if m == model) for model in actual))


def test_report_counts_unrouted_requests_apart(stack: Stack, traffic: dict) -> None:
    report = json.loads(run_report(stack.log_dir / "ledger.db", "1h", "json"))
    assert "" not in {p["provider"] for p in report["providers"]}
    assert "(none)" not in {p["provider"] for p in report["providers"]}
    unrouted = report["unrouted"]
    assert unrouted["by_status"]["404"] == 1, "the unknown model"
    assert unrouted["requests"] == len(rows(stack, "provider = ''")) == sum(
        unrouted["by_status"].values()), "and the stack's own /v1/models probes (200)"
    assert report["total"]["requests"] == len(rows(stack))


def test_replay_of_the_same_policy_changes_no_decision(stack: Stack, traffic: dict) -> None:
    result = replay(stack.log_dir / "ledger.db", load_policy_file(stack.policy),
                    traffic["start_ms"], traffic["end_ms"])
    assert result.requests == WINDOW * len(MODELS)
    assert result.changed == 0
    assert result.could_not_serve == {} and result.to_ejected == 0
    recorded = rows(stack, "at_unix_ms >= ? AND at_unix_ms < ?", traffic["start_ms"], traffic["end_ms"])
    assert result.recorded.cost_usd == pytest.approx(sum(r["cost_usd"] for r in recorded))
    assert result.replayed.cost_usd == pytest.approx(result.recorded.cost_usd)


def test_cost_first_replay_of_latency_first_traffic_costs_less(stack: Stack, traffic: dict,
                                                               tmp_path: Path) -> None:
    document = yaml.safe_load(stack.policy.read_text())
    for policy in document["policies"]:
        policy.update(strategy="cost", latency_sla_ms=0)
        policy.pop("cost_ceiling_usd_per_mtok", None)
    other = tmp_path / "cost-first.yaml"
    other.write_text(yaml.safe_dump(document, sort_keys=False))
    result = replay(stack.log_dir / "ledger.db", load_policy_file(other),
                    traffic["start_ms"], traffic["end_ms"])
    assert result.changed > 0
    assert result.replayed.cost_usd < result.recorded.cost_usd
    assert result.replayed.shares.get("vast", 0) == WINDOW, "llama-3.1-8b goes to the cheapest"


def test_why_tells_every_candidate_and_attempt_of_a_failed_over_request(
        stack: Stack, traffic: dict, capsys: pytest.CaptureFixture[str]) -> None:
    def told() -> dict:
        return explain(stack.log_dir / "ledger.db", load_policy_file(stack.policy), "failed-over")

    eventually(lambda: not told()["attempts_inferred"], "the failed attempt in the ledger")
    story = told()
    assert [c["provider"] for c in story["candidates"]] and {
        c["provider"] for c in story["candidates"]} == {"lambda", "coreweave", "vast", "runpod"}
    assert all(c["health"] is not None and c["price_usd_per_mtok"] for c in story["candidates"])
    assert story["choice"] == "coreweave" and story["failed_over"]
    assert [a["provider"] for a in story["attempts_detail"]] == ["coreweave", story["provider"]]
    first, last = story["attempts_detail"]
    assert (first["status"], first["flags"]) == (503, []), "the simulator's fault, as it answered"
    assert first["outcome"].startswith("503 after ") and first["duration_ms"] >= 0
    assert first["outcome"].endswith(" ms: retried on the next")
    assert (last["outcome"], last["status"]) == ("answered 200", 200)
    assert story["cost_usd"] > 0 and story["input_tokens"] > 0

    status, body = stack.control_get(f"/v1/why/{story['request_id']}")
    assert status == 200 and json.loads(body)["attempts_detail"] == story["attempts_detail"]
    card = json.loads(stack.control_get("/v1/dashboard")[1])["savings"]
    assert card is not None and set(card) >= {"actual_usd", "vs_cheapest", "models"}, (
        "the savings card's figure, made at start and every minute")

    with pytest.raises(SystemExit) as exit_code:
        cli.main(["why", "failed-over", "--ledger", str(stack.log_dir / "ledger.db"),
                  "--policy", str(stack.policy)])
    assert exit_code.value.code == 0
    text = capsys.readouterr().out
    assert f"1. coreweave    {first['outcome']}" in text and "(inferred" not in text
    assert all(name in text for name in ("lambda", "vast", "runpod"))
    assert not math.isnan(story["total_ms"])
