"""Billing end to end: requests to providers that report usage differently end up in the
ledger, the report, the audit log and the dashboard with the counts the providers gave."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import openai
import pytest
import yaml
from dashboard_fixtures import CHROMIUM, chromium
from polling import eventually
from stack_harness import Providers, audit_trail, chat

from control_plane.ledger.report import run_report
from gpu_router.admin_token import ADMIN_TOKEN_FILE, read_admin_token
from gpu_router.stack import Stack

BATCH = {"x-workload": "batch"}


def prices(stack: Stack) -> dict[tuple[str, str], dict[str, float]]:
    document = yaml.safe_load(stack.policy.read_text())
    return {(p["name"], m["name"]): m["price"] for p in document["providers"] for m in p["models"]}


def ledger_rows(stack: Stack) -> dict[str, sqlite3.Row]:
    """Rows by the x-request-id the test sent (the ledger's request_id is the edge's own)."""
    path = stack.log_dir / "ledger.db"
    if not path.exists():
        return {}
    connection = sqlite3.connect(path)
    connection.row_factory = sqlite3.Row
    return {row["client_request_id"]: row for row in connection.execute("select * from requests")}


def count_rows(stack: Stack) -> int:
    """Every row, whoever sent it (rows without a client id included)."""
    with sqlite3.connect(stack.log_dir / "ledger.db") as connection:
        return connection.execute("select count(*) from requests").fetchone()[0]


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> dict[str, dict]:
    """One request of each kind; request id -> the usage the provider put in its response."""
    sims = Providers(stack.policy)
    sims.reset_all()
    sent: dict[str, dict] = {}

    def send(request_id: str, model: str, headers: dict[str, str]) -> None:
        status, response_headers, body = chat(stack, model, {**headers, "x-request-id": request_id})
        assert status == 200, body
        sent[request_id] = {"usage": body.get("usage"), "provider": response_headers["x-gpu-router-provider"]}

    send("openai-json", "llama-3.1-70b", {"x-gpu-router-strategy": "cost"})       # coreweave
    send("anthropic-json", "mixtral-8x7b", BATCH)                                 # runpod
    send("no-usage", "llama-3.1-8b", BATCH)                                       # vast
    sims.fault("runpod", mode="error", status=503, rate=1.0)
    send("failed-over", "mixtral-8x7b", BATCH)                                    # runpod 503 -> lambda
    sims.reset_all()
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="llama-3.1-70b", messages=[{"role": "user", "content": "count"}], max_tokens=8,
        stream=True, stream_options={"include_usage": True},
        extra_headers={"x-request-id": "openai-stream", "x-gpu-router-strategy": "cost"}))
    sent["openai-stream"] = {"usage": chunks[-1].usage.model_dump(), "provider": "coreweave"}
    eventually(lambda: set(ledger_rows(stack)) >= set(sent), "every request in the ledger")
    return sent


def test_ledger_tokens_and_costs_match_what_the_providers_reported(stack: Stack, traffic: dict) -> None:
    rows, sheet = ledger_rows(stack), prices(stack)
    assert {request_id: rows[request_id]["provider"] for request_id in traffic} == {
        request_id: sent["provider"] for request_id, sent in traffic.items()}

    for request_id in ("openai-json", "openai-stream", "failed-over"):
        row, usage = rows[request_id], traffic[request_id]["usage"]
        assert not row["estimated"], request_id
        assert row["input_tokens"] + row["cached_input_tokens"] == usage["prompt_tokens"]
        assert row["output_tokens"] + row["reasoning_tokens"] == usage["completion_tokens"]
    anthropic = rows["anthropic-json"]
    usage = traffic["anthropic-json"]["usage"]
    assert (anthropic["input_tokens"], anthropic["output_tokens"]) == (usage["input_tokens"], usage["output_tokens"])
    assert rows["no-usage"]["estimated"] and rows["no-usage"]["input_tokens"] > 0

    for request_id in traffic:
        row = rows[request_id]
        price = sheet[(row["provider"], row["model"])]
        expected = sum(row[f"{kind}_tokens"] * price.get(kind, 0.0)
                       for kind in ("input", "output", "cached_input", "cache_write", "reasoning")) / 1e6
        assert row["cost_usd"] == pytest.approx(expected), request_id
    assert rows["failed-over"]["attempts"] == 2


def test_report_shows_each_providers_share_of_spend(stack: Stack, traffic: dict) -> None:
    rows = ledger_rows(stack)
    spend: dict[str, float] = {}
    for row in rows.values():
        spend[row["provider"]] = spend.get(row["provider"], 0.0) + row["cost_usd"]

    report = json.loads(run_report(stack.log_dir / "ledger.db", "1h", "json"))

    shares = {p["provider"]: p["spend_share"] for p in report["providers"]}
    total = sum(spend.values())
    assert total > 0
    for provider in {sent["provider"] for sent in traffic.values()}:
        assert shares[provider] == pytest.approx(spend[provider] / total), provider
    requests = {p["provider"]: p["requests"] for p in report["providers"]}
    assert sum(requests.values()) + report["unrouted"]["requests"] == count_rows(stack)


def test_audit_trail_has_one_complete_line_per_request(stack: Stack, traffic: dict) -> None:
    def entries() -> list[dict] | None:
        trail = audit_trail(stack)
        return trail if len(trail) >= len(traffic) else None

    trail = eventually(entries, "audit entries")
    assert len({entry["request_id"] for entry in trail}) == len(trail)  # each request once
    lines = {entry["client_request_id"]: entry for entry in trail}

    assert set(traffic) <= set(lines)
    failed_over = lines["failed-over"]
    assert failed_over["choice"] == "runpod" and failed_over["fallbacks"][0] == "lambda"
    outcome = failed_over["outcome"]
    assert (outcome["provider"], outcome["attempts"], outcome["status"], outcome["failed_over"]) == (
        "lambda", 2, 200, True)
    assert all(line["candidates"] and line["reason"] and line["outcome"]["cost_usd"] > 0
               for request_id, line in lines.items() if request_id in traffic)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (.ci/run installs it)")
def test_the_control_planes_dashboard_draws_the_traffic(stack: Stack, traffic: dict, tmp_path: Path) -> None:
    # As an operator's browser, once asked for the admin token (Basic, the token as password).
    token = read_admin_token(stack.certs / ADMIN_TOKEN_FILE)
    page = stack.control_url("/dashboard").replace("http://", f"http://operator:{token}@")
    dom = chromium(page, tmp_path / "profile", "--dump-dom")

    drawn = set(re.findall(r'<path [^>]*data-provider="([\w-]+)" data-series="total"', dom))
    assert drawn >= {"coreweave", "runpod", "vast", "lambda"}
    assert len(re.findall(r'<tr data-request-id="', dom)) >= len(traffic)
