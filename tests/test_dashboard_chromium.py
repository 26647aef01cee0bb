"""The dashboard renders real data in headless Chromium (Debian's `chromium` package).

The page is served with synthetic metrics from a stdlib HTTP server on 127.0.0.1; Chromium
loads it, runs its polling script, and we read back the DOM it drew and a screenshot.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dashboard_fixtures import CHROMIUM, PROVIDERS, chromium, dashboard_server, synthetic_metrics

from control_plane.dashboard.savings_card import card
from control_plane.ledger.savings import Served, compute_savings
from control_plane.policy.load import default_policy_path, load_policy_file

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")


def test_dashboard_draws_charts_and_decisions(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    groups = [Served(model="llama-3.1-8b", provider="coreweave", requests=40,
                     tokens=(4e6, 1e6, 0.0, 0.0, 0.0), cost_usd=1.5, failed_over=1,
                     extra_attempts=1)]
    savings = card(compute_savings(groups, load_policy_file(default_policy_path()), 3, now, now))
    with dashboard_server(synthetic_metrics(now), savings) as base:
        dom = chromium(f"{base}/dashboard", tmp_path / "profile-dom", "--dump-dom")
        screenshot = tmp_path / "dashboard.png"
        chromium(f"{base}/dashboard", tmp_path / "profile-png", f"--screenshot={screenshot}")

    assert "updated " in dom and "cannot load" not in dom
    for provider in PROVIDERS:
        latency = re.findall(rf'<path [^>]*data-provider="{provider}" data-series="(\w+)"', dom)
        assert sorted(latency) == ["success", "total", "ttfb"], provider
        bar = re.search(rf'<rect [^>]*width="([\d.]+)"[^>]*data-provider="{provider}"', dom)
        assert bar and float(bar.group(1)) > 1, f"cost bar for {provider}"
    for path in re.findall(r'<path [^>]*d="([^"]+)"', dom):
        assert path.count("L") >= 10, "each line has a point per 10 s bucket"
    table = dom[dom.index('id="decisions"'):]
    rows = re.findall(r'<tr data-request-id="req-\d+"', table)
    assert len(rows) == 50
    assert re.search(r'<tr data-request-id="req-\d+" class="error">', table), "429s highlighted"
    assert len(re.findall(r'<a href="/v1/why/req-\d+">req-\d+</a>', table)) == 50, "why links"
    card_html = dom[dom.index('id="savings-card"'):dom.index('id="clients"')]
    assert "served 40 requests" in card_html and "3 never reached a provider" in card_html
    assert re.search(r"<td>llama-3.1-8b</td><td class=\"num\">40</td>.*<td>vast</td>", card_html)

    data = screenshot.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 900)
