"""decide() in a tight loop, 4 candidates against 50 (issue 11: at most 50 us with 50).

Every strategy, over a routing table built as ext_proc builds it (the routed bench's policy with
N identical-GPU providers at different prices) and a health snapshot that measured each provider;
one provider in ten degraded. Prints microseconds per call (the least of --repeats runs: a
tight loop's noise on a shared machine only ever adds) and the 50/4 ratio, measured in the same
run.

    python bench/decide.py [--calls 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from rig import MODEL, bench_policy

from control_plane.policy.load import load_policy_file
from control_plane.policy.wire import to_routing_policy
from ext_proc.health_view import NOT_EJECTED, CandidateHealth
from ext_proc.routing_table import STRATEGIES, build_routing_table
from ext_proc.scoring import decide


def per_call_us(providers: int, strategy: str, calls: int, repeats: int = 1) -> float:
    with tempfile.TemporaryDirectory() as work:
        policy = load_policy_file(bench_policy(Path(work) / "p.yaml", 1, providers=providers))
    table = build_routing_table(to_routing_policy(policy))
    route = table.models[MODEL]
    rule = table.policies[0]
    rng = random.Random(providers)
    count = len(route.providers)
    health = CandidateHealth(
        latency_ms=np.array([rng.uniform(40, 400) for _ in range(count)]),
        degraded=np.array([i % 10 == 3 for i in range(count)]),
        ejected_until_unix_ms=np.full(count, NOT_EJECTED, dtype=np.int64))
    now = int(time.time() * 1000)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            decide(route, health, rule, strategy=strategy, prompt_tokens=500, max_tokens=256,
                   now_unix_ms=now)
        best = min(best, (time.perf_counter() - started) / calls * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'strategy':<10} {'4 candidates':>14} {'50 candidates':>15} {'50/4':>6}")
    for strategy in STRATEGIES:
        small = per_call_us(4, strategy, args.calls, args.repeats)
        large = per_call_us(50, strategy, args.calls, args.repeats)
        print(f"{strategy:<10} {small:11.1f} us {large:12.1f} us {large / small:6.2f}")


if __name__ == "__main__":
    main()
