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

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")


def test_dashboard_draws_charts_and_decisions(tmp_path: Path) -> None:
    with dashboard_server(synthetic_metrics(datetime.now(UTC))) as base:
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

    data = screenshot.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 900)
