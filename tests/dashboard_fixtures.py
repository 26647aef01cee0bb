"""A Metrics filled with synthetic requests, and a tiny HTTP server for the dashboard tests."""

from __future__ import annotations

import json
import random
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from usage_fixtures import make_record

from control_plane.dashboard.data import DATA_PATH, dashboard_data, dashboard_files
from control_plane.metrics import Metrics
from control_plane.usage.normalise import normalise
from gpu_router.processes import free_port

PROVIDERS = {"coreweave": (25.0, 0.00004), "lambda": (40.0, 0.00006), "runpod": (60.0, 0.00002),
             "vast": (120.0, 0.00001)}


def synthetic_metrics(now: datetime, minutes: int = 5) -> Metrics:
    """Requests for every provider in each 10 s bucket of the last `minutes`; some fail."""
    rng = random.Random(7)
    metrics = Metrics()
    now_ms = int(now.timestamp() * 1000)
    count = 0
    for age_ms in range(minutes * 60_000, 0, -2_500):
        for provider, (ttfb, cost) in PROVIDERS.items():
            count += 1
            status = 429 if provider == "vast" and rng.random() < 0.3 else 200
            ttfb_ms = ttfb * rng.uniform(0.8, 1.6)
            record = make_record(request_id=f"req-{count}", at_unix_ms=now_ms - age_ms,
                                 provider=provider, status=status, ttfb_ms=ttfb_ms,
                                 total_ms=ttfb_ms + rng.uniform(20, 80),
                                 attempts=2 if status == 429 else 1)
            metrics.observe(record, normalise(record, "openai"), cost if status == 200 else 0.0)
    return metrics


@contextmanager
def dashboard_server(metrics: Metrics, savings: dict | None = None) -> Iterator[str]:
    """Serves the dashboard files and /v1/dashboard (with `savings` as the savings card's
    figure) on 127.0.0.1; yields the base URL."""
    files = dashboard_files()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == DATA_PATH:
                content_type = "application/json"
                body = json.dumps(dashboard_data(metrics, datetime.now(UTC),
                                                 savings=savings)).encode()
            elif path in files:
                content_type, body = files[path]
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the test output is for failures."""

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


CHROMIUM = Path("/usr/bin/chromium")


def chromium(url: str, profile: Path, *output: str) -> str:
    """Runs headless Chromium on `url` with `output` flags (--dump-dom, --screenshot=...)."""
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
        "--window-size=1280,900", *output, url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout
