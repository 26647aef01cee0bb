"""Closed-loop client load for the failover benchmarks, and what it saw per phase.

Each client thread sends requests back to back over one keep-alive connection and records
(start, latency, status, provider) per request; a transport failure is status 0. A Phase is a
named window of start times with Envoy's counters at both ends, so a row reads: requests,
failures, upstream attempts per request and client latency in that window.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Self

from gpu_router.processes import EnvoyAdmin

MODEL = "llama-3.1-8b"
BODY = json.dumps({"model": MODEL, "max_tokens": 8,
                   "messages": [{"role": "user", "content": "hello"}]}).encode()
HEADERS = {"content-type": "application/json", "x-workload": "batch"}
"""The batch policy: cost-first, so one provider wins every request while it is healthy."""


@dataclass(frozen=True, slots=True)
class Sample:
    started: float
    latency_s: float
    status: int
    """HTTP status; 0 when no answer came back (reset, refused, timeout)."""
    provider: str
    """x-gpu-router-provider: who finally served."""


class Load:
    """`clients` threads spread over `ports`, until stopped."""

    def __init__(self, ports: Sequence[int], clients: int, timeout_s: float = 30.0) -> None:
        self.samples: list[Sample] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.timeout_s = timeout_s
        self.threads = [threading.Thread(target=self.run, args=(ports[i % len(ports)],),
                                         daemon=True) for i in range(clients)]

    def __enter__(self) -> Self:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=self.timeout_s + 5)

    def run(self, port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=self.timeout_s)
        while not self.stop.is_set():
            started = time.monotonic()
            provider = ""
            try:
                connection.request("POST", "/v1/chat/completions", BODY, HEADERS)
                response = connection.getresponse()
                response.read()
                status, provider = response.status, response.getheader("x-gpu-router-provider", "")
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=self.timeout_s)
                status = 0
            with self.lock:
                self.samples.append(Sample(started, time.monotonic() - started, status, provider))

    def window(self, start: float, end: float) -> list[Sample]:
        with self.lock:
            return [s for s in self.samples if start <= s.started < end]


def percentile_ms(values: Sequence[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) >= 2 else float("nan")


def counters(
    admins: Sequence[EnvoyAdmin], providers: Sequence[str], extra: Sequence[str] = ()
) -> tuple[int, ...]:
    """(client requests, attempts on provider clusters, *the `extra` stats) summed over every
    Envoy node."""
    totals = [0] * (2 + len(extra))
    for admin in admins:
        stats = admin.stats()
        totals[0] += stats.get("http.edge.downstream_rq_total", 0)
        totals[1] += sum(stats.get(f"cluster.{p}.upstream_rq_total", 0) for p in providers)
        for index, name in enumerate(extra, start=2):
            totals[index] += stats.get(name, 0)
    return tuple(totals)


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    start: float
    end: float
    requests: int
    """Client requests Envoy received in the phase (http.edge.downstream_rq_total)."""
    attempts: int
    """Attempts Envoy sent to provider clusters in the phase (their upstream_rq_total)."""
    extra: tuple[int, ...] = ()
    """How much each of the Phases' extra stats grew in the phase."""


class Phases:
    """Phases recorded back to back: each starts where the previous one ended."""

    def __init__(self, load: Load, admins: Sequence[EnvoyAdmin], providers: Sequence[str],
                 extra: Mapping[str, str] | None = None) -> None:
        """`extra`: column label -> Envoy stat, reported as its growth per phase."""
        self.load, self.admins, self.providers = load, admins, providers
        self.extra = dict(extra or {})
        self.done: list[Phase] = []
        self._start = time.monotonic()
        self._counters = self._read()

    def _read(self) -> tuple[int, ...]:
        return counters(self.admins, self.providers, list(self.extra.values()))

    def mark(self, name: str) -> None:
        """End the current phase here, naming it."""
        now, now_counters = time.monotonic(), self._read()
        grown = (b - a for a, b in zip(self._counters, now_counters, strict=True))
        requests, attempts, *extra = grown
        self.done.append(Phase(name, self._start, now, requests, attempts, tuple(extra)))
        self._start, self._counters = now, now_counters

    def run(self, name: str, seconds: float, during: Callable[[], None] | None = None) -> None:
        """Let the load run `seconds` (calling `during` every 20 ms), then mark the phase."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if during is not None:
                during()
            time.sleep(0.02)
        self.mark(name)

    def report(self) -> str:
        extra = "".join(f" {label:>{len(label)}}" for label in self.extra)
        lines = [(f"{'phase':<36} {'requests':>8} {'failed':>6} {'attempts/req':>12}"
                  f" {'p50 ms':>8} {'p99 ms':>8}{extra}  served by (failed: status)")]
        for phase in self.done:
            window = self.load.window(phase.start, phase.end)
            latencies = [s.latency_s for s in window]
            per_request = phase.attempts / phase.requests if phase.requests else float("nan")
            served = Counter(s.provider for s in window if s.status == 200)
            failed = Counter(s.status for s in window if s.status != 200)
            outcomes = [f"{name} {n}" for name, n in served.most_common()]
            outcomes += [f"failed: {status} {n}" for status, n in sorted(failed.items())]
            lines.append(
                f"{phase.name:<36} {len(window):>8} {failed.total():>6} {per_request:>12.2f}"
                f" {percentile_ms(latencies, 50):>8.1f} {percentile_ms(latencies, 99):>8.1f}"
                + "".join(f" {n:>{len(label)}}" for label, n in zip(self.extra, phase.extra))
                + f"  {', '.join(outcomes)}"
            )
        return "\n".join(lines)
