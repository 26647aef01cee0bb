"""Routed path vs Envoy direct and vs the floor of the stack, in one run.

Starts a fast upstream (an Envoy answering every request itself), a baseline Envoy
that routes straight to it (no ext_proc), the floor (that Envoy with a fixed-answer grpc.aio
ext_proc, bench/floor_ext_proc.py), the floor over HTTP/2 ("floor h2": the same answer to the
ext_proc filter's http_service, bench/floor_ext_proc_h2.py) and the gpu-router stack in front
of the same upstream; then drives them with wrk and prints latency and throughput with the
ratios against the baseline, plus ext_proc's own time as Envoy's ext_proc filter measured
it (Envoy has no ext_proc timing stat of its own), and at 16 connections the CPU time each
process spent per request: on a 2-core machine, 2 s of CPU per second bounds the req/s.

The ratios that matter (routed/floor, accounting on/off, floor h2/floor) are measured a second
time with the two floors and the two single-worker stacks loaded in turn at 16 connections, --rounds rounds of
forward then reverse order (wrk_load.interleaved): a shared machine drifts within minutes, and
the table's rows are minutes apart. Each load in turn also prints the hypervisor's steal (the
share of the machine's CPU time that was not ours, /proc/stat): on a VM, rounds with more steal
do fewer req/s at the same CPU per request.

    python bench/routed_path.py [--duration 10] [--workers 1 2] [--rounds 2] [--client-keys 100]
                                [--providers 4] [--provider-scaling 4 50]

--client-keys N also compares two x1 stacks at 16 connections, one whose policy declares N
client keys (the load sends one of them) and one without clients, loaded in turn (A B B A):
what the key check costs, printed as the req/s ratio keys/no-keys. --provider-scaling A B
compares the same way a policy of B identical providers with one of A: whether a request's
cost grows with the providers (config, route matching, decide()).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rig import BENCH_KEY, bench_policy, chat_body, direct_envoy, fast_upstream, floor_stack
from wrk_load import (
    Interleaved,
    Load,
    Target,
    cpu_reading,
    interleaved,
    per_request,
    wrk,
    wrk_with_cpu,
)

from gpu_router.processes import free_port
from gpu_router.stack import Stack, StackPorts


def ext_proc_histogram(stack: Stack) -> dict[str, float]:
    """gpu_router_ext_proc_duration_seconds from the control plane: ext_proc's time per request
    as Envoy's ext_proc filter measured it (Envoy has no stat for it, and the ext_proc gRPC
    cluster records no upstream_rq_time for these streams). Sample name -> value."""
    _, body = stack.control_get("/metrics")
    samples = (line.partition(" ") for line in body.decode().splitlines())
    return {name: float(value) for name, _, value in samples
            if name.startswith("gpu_router_ext_proc_duration_seconds")}


def ext_proc_time(before: dict[str, float], after: dict[str, float]) -> str:
    """Mean and bucket-bounded p50/p99 of the requests between two histogram readings."""
    delta = {name: after[name] - before.get(name, 0.0) for name in after}
    count = delta.get("gpu_router_ext_proc_duration_seconds_count", 0.0)
    if not count:
        return "(no samples)"
    buckets = sorted((float(name.split('le="')[1].rstrip('"}')), n) for name, n in delta.items()
                     if 'le="' in name and "+Inf" not in name)
    p50 = next((le for le, n in buckets if n >= count / 2), float("inf"))
    p99 = next((le for le, n in buckets if n >= count * 0.99), float("inf"))
    mean = delta["gpu_router_ext_proc_duration_seconds_sum"] / count
    return f"mean {mean * 1000:.3f} ms, p50 <= {p50 * 1000:g} ms, p99 <= {p99 * 1000:g} ms"


def timed_wrk(stack: Stack, url: str, body: bytes, connections: int, seconds: int,
              work: Path, key: str = "") -> tuple[Load, str]:
    """A load and ext_proc's own time during it (the access log reaches the control plane
    within its 100 ms flush interval: read after it)."""
    before = ext_proc_histogram(stack)
    load = wrk(url, body, connections, seconds, work, key)
    time.sleep(0.5)
    return load, ext_proc_time(before, ext_proc_histogram(stack))


def stack_pids(stack: Stack) -> dict[str, int]:
    return {"edge": stack.processes["edge-1"].pid, "ext_proc": stack.processes["ext-proc-1"].pid,
            "control plane": stack.processes["control-plane"].pid}


def ab_ratios(work: Path, policy: Path, other: Path, seconds: int, key: str = "",
              rounds: int = 2) -> Interleaved:
    """Stack "a" on `policy` and stack "b" on `other` (the load sends `key` to "b" only), one
    ext_proc worker each, accounting off, at 16 connections, loaded in turn (A B B A ...)."""
    stacks: dict[str, Stack] = {}
    try:
        for name, path in (("a", policy), ("b", other)):
            stacks[name] = Stack(policy=path, log_dir=work / f"ratio-{name}-{other.stem}",
                                 ports=StackPorts.free(), accounting=["--no-accounting"],
                                 simulators=False).start()
        return interleaved([Target(name, f"{stack.url}/v1/chat/completions", stack_pids(stack),
                                   key if name == "b" else "") for name, stack in stacks.items()],
                           chat_body(64), 16, seconds, work, rounds)
    finally:
        for stack in stacks.values():
            stack.stop()


def print_comparison(title: str, result: Interleaved, over: str, under: str, label: str) -> None:
    print(f"\n{title}:")
    for index, ratio in enumerate(result.round_ratios(over, under)):
        steal = " / ".join(f"{result.steal[name][index]:.0%}" for name in (over, under))
        print(f"  round {index + 1:<4} {label} {ratio:5.3f} (hypervisor steal {steal})")
    print(f"  all        {label} {result.ratio(over, under):5.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="ext_proc worker counts")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of the interleaved comparisons (each loads every target once)")
    parser.add_argument("--client-keys", type=int, default=0,
                        help="also compare x1 with this many client keys declared to x1 without (e.g. 100)")
    parser.add_argument("--providers", type=int, default=1,
                        help="identical providers in the routed stacks' policy, all on the fast upstream")
    parser.add_argument("--provider-scaling", type=int, nargs=2, metavar=("A", "B"),
                        help="also compare x1 with B providers to x1 with A (e.g. 4 50)")
    parser.add_argument("--no-accounting-run", action="store_true",
                        help="skip the run with usage accounting (ledger, audit trail) off")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("bench needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    if importlib.util.find_spec("h2") is None:  # its HTTP/2 floor (bench/floor_ext_proc_h2.py)
        print("bench needs h2 (pip install -e '.[bench]')", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="gpu-router-bench-"))
    cpu: dict[str, dict[str, float]] = {}
    """Per path at 16 connections: process -> CPU microseconds per request."""
    upstream_port, direct_port = free_port(), free_port()
    children = [fast_upstream(work, upstream_port)]
    stacks: dict[str, Stack] = {}
    """The single-worker stacks, kept running for the interleaved comparison."""
    try:
        children.append(direct_envoy(work, direct_port, upstream_port))
        small, large = chat_body(64), chat_body(200 * 1024)
        direct_url = f"http://127.0.0.1:{direct_port}/v1/chat/completions"
        direct_pids = {"envoy": children[1].pid, "upstream": children[0].pid}
        direct_16, cpu["direct"] = wrk_with_cpu(direct_url, small, 16, args.duration, work,
                                                direct_pids)
        rows = [("direct", "1 conn", wrk(direct_url, small, 1, args.duration, work)),
                ("direct", "16 conn", direct_16),
                ("direct", "1 conn 200KB", wrk(direct_url, large, 1, args.duration, work))]
        base = {label: load for _, label, load in rows}
        floor_targets = []
        for name, http2 in (("floor", False), ("floor h2", True)):
            floor_port = free_port()
            floor = floor_stack(work, floor_port, upstream_port, http2)
            children += floor
            floor_targets.append(Target(name, f"http://127.0.0.1:{floor_port}/v1/chat/completions",
                                        {"envoy": floor[1].pid, "ext_proc": floor[0].pid,
                                         "upstream": children[0].pid}))
        for target in floor_targets:
            floor_16, cpu[target.name] = wrk_with_cpu(target.url, small, 16, args.duration, work,
                                                      target.pids)
            rows += [(target.name, "1 conn", wrk(target.url, small, 1, args.duration, work)),
                     (target.name, "16 conn", floor_16)]
        floors = {label: load for name, label, load in rows if name == "floor"}
        policy = bench_policy(work / "policy.yaml", upstream_port, providers=args.providers)
        timings = {}
        runs = [(f"routed x{w}", w, True) for w in args.workers]
        if not args.no_accounting_run:
            runs.append(("x1 acct off", 1, False))
        if args.client_keys:
            keys = ab_ratios(work, policy, bench_policy(
                work / "keyed.yaml", upstream_port, args.client_keys), args.duration, BENCH_KEY,
                args.rounds)
        if args.provider_scaling:
            fewer, more = args.provider_scaling
            scaling = ab_ratios(
                work, bench_policy(work / f"providers-{fewer}.yaml", upstream_port, providers=fewer),
                bench_policy(work / f"providers-{more}.yaml", upstream_port, providers=more),
                args.duration, rounds=args.rounds)
        for name, workers, accounting in runs:
            log_dir = work / name.replace(" ", "-")
            flags = (["--ledger", str(log_dir / "ledger.db")]  # the audit trail is read from it
                     if accounting else ["--no-accounting"])
            stack = stacks[name] = Stack(policy=policy, log_dir=log_dir, ports=StackPorts.free(),
                                         accounting=flags, ext_proc_workers=workers,
                                         simulators=False).start()
            routed_url = f"{stack.url}/v1/chat/completions"
            pids = {**stack_pids(stack), "upstream": children[0].pid}
            for label, body, connections in (("1 conn", small, 1), ("16 conn", small, 16),
                                             ("1 conn 200KB", large, 1)):
                before = cpu_reading(pids)
                load, timing = timed_wrk(stack, routed_url, body, connections, args.duration, work)
                if connections == 16:
                    cpu[name] = per_request(before, cpu_reading(pids), load)
                rows.append((name, label, load))
                timings[f"{name}, {label}"] = timing
            if workers != 1:
                stacks.pop(name).stop()
        compared = interleaved(
            [*floor_targets, *(Target(name, f"{stack.url}/v1/chat/completions",
                                    {**stack_pids(stack), "upstream": children[0].pid})
                             for name, stack in stacks.items())],
            small, 16, args.duration, work, args.rounds)
    finally:
        for stack in stacks.values():
            stack.stop()
        for child in children:
            child.stop()

    print_table(rows, base, floors)
    print("\next_proc's own time per request (Envoy's ext_proc filter, via /metrics):")
    for name, text in timings.items():
        print(f"  {name:<28} {text}")
    print_cpu("CPU microseconds per request at 16 connections, per process (2 cores give 2e6 per "
              "second)", cpu)
    print_interleaved(compared, args.rounds)
    if args.client_keys:
        print_comparison(f"client key check, {args.client_keys} keys declared vs no clients (x1, "
                         "16 conn, the two stacks loaded in turn, ABBA)", keys, "b", "a",
                         "rps keys/no-keys")
    if args.provider_scaling:
        print_comparison(f"{more} providers vs {fewer} (x1, 16 conn, accounting off, loaded in "
                         "turn, ABBA)", scaling, "b", "a", f"rps {more}/{fewer}")
        for count, which in ((fewer, "a"), (more, "b")):
            parts = ", ".join(f"{process} {us:.0f}" for process, us in scaling.cpu_us[which].items())
            print(f"  CPU us per request, {count} providers: {parts}")
    return 0


def print_table(rows: list[tuple[str, str, Load]], base: dict[str, Load],
                floors: dict[str, Load]) -> None:
    print(f"{'path':<12} {'load':<14} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} {'errors':>6}"
          f" {'p50 +ms':>8} {'rps ratio':>9} {'/floor':>7}")
    for name, label, load in rows:
        ref = base[label]
        over_floor = (f"{load.rps / floors[label].rps:7.2f}" if name not in ("direct", "floor")
                      and label in floors else "")
        print(f"{name:<12} {label:<14} {load.p50_ms:8.3f} {load.p99_ms:8.3f} {load.rps:9.0f} {load.errors:6d}"
              f" {load.p50_ms - ref.p50_ms:8.3f} {load.rps / ref.rps:9.2f} {over_floor}")
    print("(p50 +ms and rps ratio against Envoy direct; /floor: req/s over the floor's, Envoy with a"
          " fixed-answer grpc.aio ext_proc)")
    loads = {(name, label): load for name, label, load in rows}
    if ("x1 acct off", "1 conn") in loads and ("routed x1", "1 conn") in loads:
        print("\nusage accounting (ledger, audit trail) on vs off, the rows above (one ext_proc process):")
        for label in ("1 conn", "16 conn", "1 conn 200KB"):
            on, off = loads[("routed x1", label)], loads[("x1 acct off", label)]
            print(f"  {label:<14} rps on/off {on.rps / off.rps:5.2f}   p50 added {on.p50_ms - off.p50_ms:+.3f} ms")


def print_cpu(title: str, cpu: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}:")
    for name, spent in cpu.items():
        parts = ", ".join(f"{process} {us:.0f}" for process, us in spent.items())
        print(f"  {name:<12} {parts}; total with wrk {sum(spent.values()):.0f} -> at most "
              f"{2e6 / sum(spent.values()):.0f} req/s on this machine")


def print_interleaved(result: Interleaved, rounds: int) -> None:
    """The floor and the single-worker stacks at 16 connections, loaded in turn."""
    print(f"\nInterleaved at 16 connections ({rounds} rounds, forward then reverse order):")
    for name, per_round in result.rps.items():
        steal = ", ".join(f"{share:.0%}" for share in result.steal[name])
        print(f"  {name:<12} req/s {', '.join(f'{rps:.0f}' for rps in per_round)}; "
              f"mean {sum(per_round) / len(per_round):.0f}; hypervisor steal {steal}")
    print(f"  floor h2 / floor    {result.ratio('floor h2', 'floor'):5.3f} (ext_proc over HTTP/2, "
          "Envoy's http_service, against gRPC)")
    if "routed x1" in result.rps:
        print(f"  routed x1 / floor   {result.ratio('routed x1', 'floor'):5.3f}")
    if "x1 acct off" in result.rps:
        print(f"  acct off / floor    {result.ratio('x1 acct off', 'floor'):5.3f}")
        if "routed x1" in result.rps:
            rounds_text = ", ".join(f"{r:.3f}" for r in result.round_ratios("routed x1", "x1 acct off"))
            print(f"  accounting on/off   {result.ratio('routed x1', 'x1 acct off'):5.3f} (rounds {rounds_text})")
    print_cpu("CPU microseconds per request, interleaved loads", result.cpu_us)


if __name__ == "__main__":
    sys.exit(main())
