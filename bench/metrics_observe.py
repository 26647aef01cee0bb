"""Cost of `Metrics.observe`, the control plane's per-request hot path: µs per call.

Rounds of a tight loop over a realistic mix (4 providers x 2 models, a few decision reasons, some
errors, failovers and ext_proc timings), after a warm-up so every label set exists;
each round timed in this thread's CPU time (the machine is shared: wall time is noisy),
the best and median round printed.

    python bench/metrics_observe.py [--calls 200000]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from control_plane.metrics import Metrics
from control_plane.usage.normalise import Usage
from control_plane.usage.record import RequestRecord

ROUNDS = 5

BASE = RequestRecord(
    request_id="req-1", at_unix_ms=1_700_000_000_000, model="llama-3.1-8b", policy="interactive",
    strategy="latency", reason="fastest: 42 ms EWMA", fallbacks=("runpod", "lambda"),
    candidates="", provider="coreweave", attempts=1, status=200, ttfb_ms=30.0, total_ms=55.0,
    stream=False, request_bytes=466, response_bytes=316, usage_text="",
)
USAGE = Usage(input_tokens=100, output_tokens=20, cached_input_tokens=40, cache_write_tokens=0,
              reasoning_tokens=0, estimated=False)


def records(count: int) -> list[RequestRecord]:
    providers = ("coreweave", "runpod", "lambda", "vast")
    models = ("llama-3.1-8b", "llama-3.1-70b")
    reasons = ("fastest: 42 ms EWMA", "cheapest within 2000 ms SLA: $0.0001", "unmeasured")
    return [
        replace(BASE, provider=providers[i % 4], model=models[i // 4 % 2],
                reason=reasons[i % 3], status=(429 if i % 50 == 0 else 200),
                attempts=(2 if i % 20 == 0 else 1), ext_proc_us=(300 + i % 500),
                at_unix_ms=BASE.at_unix_ms + i, total_ms=float(5 + i % 3000),
                ttfb_ms=float(2 + i % 400))
        for i in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200_000)
    calls = parser.parse_args().calls
    mix = records(1000)
    metrics = Metrics()
    for record in mix:
        metrics.observe(record, USAGE, 0.001)
    rounds = []
    for _ in range(ROUNDS):
        started = time.thread_time()
        for i in range(calls // ROUNDS):
            metrics.observe(mix[i % 1000], USAGE, 0.001)
        rounds.append((time.thread_time() - started) / (calls // ROUNDS) * 1e6)
    rounds.sort()
    print(f"Metrics.observe: best {rounds[0]:.2f} µs, median {rounds[ROUNDS // 2]:.2f} µs "
          f"per call ({ROUNDS} rounds of {calls // ROUNDS})")


if __name__ == "__main__":
    main()
