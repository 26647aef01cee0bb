"""The dashboard's JSON and files, over a real HTTP round trip."""

from __future__ import annotations

import json
import urllib.request
from datetime import UTC, datetime

import pytest
from dashboard_fixtures import PROVIDERS, dashboard_server, synthetic_metrics
from usage_fixtures import make_record

from control_plane.dashboard.data import DATA_PATH, dashboard_data, dashboard_files
from control_plane.metrics import Metrics
from control_plane.usage.normalise import normalise

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def test_data_has_series_totals_and_decisions() -> None:
    data = dashboard_data(synthetic_metrics(NOW), NOW)
    assert data["providers"] == sorted(PROVIDERS)
    assert data["bucket_s"] == 10 and data["now_unix_ms"] == int(NOW.timestamp() * 1000)
    coreweave = data["series"]["coreweave"]
    assert len(coreweave) == 30, "5 minutes of 10 s buckets"
    assert all(p["success_rate"] == 1.0 and p["ttfb_p50_ms"] <= p["total_p50_ms"]
               for p in coreweave)
    assert data["totals"]["coreweave"]["cost_per_request_usd"] == pytest.approx(0.00004)
    vast = data["totals"]["vast"]
    assert 0 < vast["errors"] < vast["requests"]
    assert vast["success_rate"] == pytest.approx(1 - vast["errors"] / vast["requests"])
    assert len(data["decisions"]) == 50
    assert data["decisions"][0]["at_unix_ms"] >= data["decisions"][-1]["at_unix_ms"]
    json.dumps(data)


def test_only_the_last_hour_is_shown() -> None:
    metrics = Metrics()
    for age_s in (4000, 30):
        record = make_record(at_unix_ms=int(NOW.timestamp() * 1000) - age_s * 1000)
        metrics.observe(record, normalise(record, "openai"), 0.0)
    data = dashboard_data(metrics, NOW)
    assert len(data["series"]["coreweave"]) == 1
    assert data["totals"]["coreweave"]["requests"] == 1


def test_empty_metrics() -> None:
    data = dashboard_data(Metrics(), NOW)
    assert (data["providers"], data["series"], data["totals"], data["decisions"]) == (
        [], {}, {}, [])


def test_files_are_self_contained() -> None:
    files = dashboard_files()
    assert set(files) == {"/dashboard", "/dashboard/", "/dashboard/dashboard.js",
                          "/dashboard/dashboard.css"}
    html = files["/dashboard"][1].decode()
    assert files["/dashboard"][0].startswith("text/html")
    for _, body in files.values():
        text = body.decode()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text and "//cdn" not in text and "@import" not in text
    assert '<script src="/dashboard/dashboard.js">' in html
    assert DATA_PATH in files["/dashboard/dashboard.js"][1].decode()


def test_served_over_http() -> None:
    with dashboard_server(synthetic_metrics(datetime.now(UTC))) as base:
        with urllib.request.urlopen(f"{base}{DATA_PATH}", timeout=10) as response:
            data = json.load(response)
        with urllib.request.urlopen(f"{base}/dashboard", timeout=10) as response:
            page = response.read().decode()
    assert data["providers"] == sorted(PROVIDERS)
    assert "<title>gpu-router dashboard</title>" in page


def test_requests_that_reached_no_provider_are_counted_apart() -> None:
    metrics = Metrics()
    now_ms = int(NOW.timestamp() * 1000)
    for index, (provider, status) in enumerate([("coreweave", 200), ("", 404), ("", 401)]):
        record = make_record(request_id=f"r{index}", at_unix_ms=now_ms - 1000, provider=provider,
                             status=status)
        metrics.observe(record, normalise(record, "openai"), 0.0)
    data = dashboard_data(metrics, NOW)
    assert data["providers"] == ["coreweave"], "no provider named none"
    assert data["unrouted"] == {"requests": 2, "errors": 0}


def test_the_savings_card_reads_the_ledger_off_the_dashboard_poll(tmp_path) -> None:
    from control_plane.dashboard.savings_card import SavingsCard
    from control_plane.ledger.store import LedgerWriter, ledger_row
    from control_plane.policy.load import default_policy_path, load_policy_file

    path = tmp_path / "ledger.db"
    config = load_policy_file(default_policy_path())
    savings = SavingsCard(path, lambda: config)
    savings.refresh()
    assert savings.summary is None, "no ledger yet: no figure"
    writer = LedgerWriter(path)
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    for index, provider in enumerate(("coreweave", "vast", "")):
        record = make_record(request_id=f"r{index}", at_unix_ms=now_ms - 1000,
                             provider=provider, model="llama-3.1-8b")
        writer.add(ledger_row(record, normalise(record, "openai"), 0.001))
    writer.close()
    savings.refresh()
    assert savings.summary is not None
    assert (savings.summary["requests"], savings.summary["unrouted"]) == (2, 1)
    assert savings.summary["models"][0]["cheapest"] == "vast"
    json.dumps(savings.summary)
