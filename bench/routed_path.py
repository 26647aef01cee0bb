"""Routed path vs Envoy direct, in one run.

Starts a fast upstream (an Envoy answering every request itself), a baseline Envoy
that routes straight to it (no ext_proc), and the gpu-router stack in front of the
same upstream; then drives both with wrk and prints latency and throughput with the
ratios against the baseline, plus ext_proc's own time as Envoy's ext_proc filter measured
it (Envoy has no ext_proc timing stat of its own), and at 16 connections the CPU time each
process spent per request: on a 2-core machine, 2 s of CPU per second bounds the req/s.

    python bench/routed_path.py [--duration 10] [--workers 1 2] [--client-keys 100] [--providers 4]
                                [--provider-scaling 4 50]

--client-keys N also compares two x1 stacks at 16 connections, one whose policy declares N
client keys (the load sends one of them) and one without clients, loaded in turn (A B B A):
what the key check costs, printed as the req/s ratio keys/no-keys. --provider-scaling A B
compares the same way a policy of B identical providers with one of A: whether a request's
cost grows with the providers (config, route matching, decide()).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from gpu_router.processes import (
    EnvoyAdmin,
    ManagedProcess,
    envoy_binary,
    free_port,
    http_get,
    port_open,
)
from gpu_router.stack import Stack, StackPorts

MODEL = "bench-model"
COMPLETION = json.dumps({
    "id": "bench", "object": "chat.completion", "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
})


def static_envoy(name: str, work: Path, listen_port: int, route: dict, clusters: list[dict],
                 concurrency: list[str] = (), filters: list[dict] = (),
                 access_log: list[dict] = ()) -> ManagedProcess:
    admin = free_port()
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": name, "per_connection_buffer_limit_bytes": 33554432,
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": name,
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
                        "http_filters": [*filters, {"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                        "access_log": list(access_log),
                    }}]}],
            }],
            "clusters": clusters,
        },
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [envoy_binary(), "-c", str(path), "--base-id", str(free_port()), "--log-level", "error",
            *concurrency]
    process = ManagedProcess(name, argv, work / f"{name}.log").start()
    process.wait_until(EnvoyAdmin(admin).ready, f"{name} to start")
    return process


def fast_upstream(work: Path, port: int) -> ManagedProcess:
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": COMPLETION}},
             "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}]}
    return static_envoy("upstream", work, port, route, [], ["--concurrency", "1"])


def direct_envoy(work: Path, port: int, upstream_port: int) -> ManagedProcess:
    route = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
    return static_envoy("direct", work, port, route, [_cluster("upstream", upstream_port)])


def _cluster(name: str, port: int, **extra: object) -> dict:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s", **extra,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}


def floor_stack(work: Path, port: int, upstream_port: int) -> list[ManagedProcess]:
    """The floor of the chosen stack: an Envoy with the edge's ext_proc filter settings (request
    headers only, one message per request, same timeout) in front of a grpc.aio ext_proc that
    answers every request with one fixed header mutation (bench/floor_ext_proc.py)."""
    grpc_port = free_port()
    server = ManagedProcess("floor-ext-proc", [sys.executable, str(Path(__file__).with_name(
        "floor_ext_proc.py")), f"127.0.0.1:{grpc_port}"], work / "floor-ext-proc.log").start()
    ext_proc = {"name": "envoy.filters.http.ext_proc", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "floor-ext-proc"}},
        "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SKIP",
                            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"},
        "message_timeout": "0.2s", "failure_mode_allow": False}}
    h2 = {"typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}}
    try:
        server.wait_until(lambda: port_open(grpc_port), "the floor ext_proc to listen")
        envoy = static_envoy("floor", work, port, {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}},
                             [_cluster("upstream", upstream_port), _cluster("floor-ext-proc", grpc_port, **h2)],
                             filters=[ext_proc])
    except BaseException:
        server.stop()
        raise
    return [server, envoy]


def bench_policy(path: Path, upstream_port: int, keys: int = 0, providers: int = 1) -> Path:
    """The bench policy: `providers` identical providers on the fast upstream (one: "fast");
    with `keys`, that many clients, the first holding BENCH_KEY."""
    clients = [{"name": f"client-{i}",
                "key_sha256": hashlib.sha256(BENCH_KEY.encode() if i == 0 else os.urandom(32)).hexdigest()}
               for i in range(keys)]
    names = ["fast"] if providers == 1 else [f"fast-{i}" for i in range(providers)]
    path.write_text(yaml.safe_dump({
        **({"clients": clients} if clients else {}),
        "version": 1,
        "providers": [{
            "name": name, "base_url": f"http://127.0.0.1:{upstream_port}", "health_check_path": "/health",
            "gpus": [{"type": "H100", "memory_gb": 80}],
            "models": [{"name": MODEL, "id": MODEL, "gpu": "H100", "price": {"input": 0.1, "output": 0.1, "cached_input": 0.05, "reasoning": 0.1}}],
        } for name in names],
        "models": [{"name": MODEL, "min_gpu_memory_gb": 1}],
        "policies": [{"name": "all", "strategy": "balanced"}],
    }))
    return path


BENCH_KEY = "gr-bench-" + os.urandom(16).hex()


@dataclass(frozen=True)
class Load:
    p50_ms: float
    p99_ms: float
    rps: float
    errors: int
    requests: int


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
%s
local f = io.open("%s", "rb"); wrk.body = f:read("*a"); f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT {\\"p50\\":%%d,\\"p99\\":%%d,\\"requests\\":%%d,\\"duration\\":%%d,\\"errors\\":%%d}\\n",
    latency:percentile(50), latency:percentile(99), summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def wrk(url: str, body: bytes, connections: int, seconds: int, work: Path, key: str = "") -> Load:
    body_path = work / f"body-{len(body)}.json"
    body_path.write_bytes(body)
    script = work / f"wrk-{len(body)}{'-key' if key else ''}.lua"
    auth = f'wrk.headers["authorization"] = "Bearer {key}"' if key else ""
    script.write_text(WRK_SCRIPT % (auth, body_path))
    threads = min(connections, 2)
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    return Load(result["p50"] / 1000, result["p99"] / 1000,
                result["requests"] / (result["duration"] / 1e6), result["errors"], result["requests"])


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live children (ext_proc's workers are its children)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def cpu_reading(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far per process, and of every child this script waited for (wrk)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {**{name: cpu_seconds(pid) for name, pid in pids.items()}, "wrk": usage.ru_utime + usage.ru_stime}


def per_request(before: dict[str, float], after: dict[str, float], load: Load) -> dict[str, float]:
    """Microseconds of CPU per request each process spent between two readings."""
    return {name: (after[name] - before[name]) * 1e6 / max(load.requests, 1) for name in before}


def chat_body(prompt_bytes: int) -> bytes:
    return json.dumps({"model": MODEL, "max_tokens": 16,
                       "messages": [{"role": "user", "content": "x" * prompt_bytes}]}).encode()


def ext_proc_histogram(stack: Stack) -> dict[str, float]:
    """gpu_router_ext_proc_duration_seconds from the control plane: ext_proc's time per request
    as Envoy's ext_proc filter measured it (Envoy has no stat for it, and the ext_proc gRPC
    cluster records no upstream_rq_time for these streams). Sample name -> value."""
    _, body = http_get(stack.control_url("/metrics"))
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
              rounds: int = 2) -> tuple[list[tuple[str, float]], list[dict[str, float]]]:
    """req/s of the stack on `other` over req/s of the one on `policy` (the load sends `key` to
    `other` only), one ext_proc worker each, at 16 connections: both stacks run at once and are
    loaded in turn (A B B A ...), so a neighbour's load on a shared machine weighs on both alike.
    Per round, then over all rounds; and each stack's CPU microseconds per request per process
    over all its rounds."""
    stacks = []
    spent: list[dict[str, float]] = [{}, {}]
    served = [0, 0]
    try:
        for name, path in (("a", policy), ("b", other)):
            stacks.append(Stack(policy=path, log_dir=work / f"ratio-{name}-{other.stem}",
                                ports=StackPorts.free(), accounting=["--no-accounting"],
                                simulators=False).start())
        body, totals, out = chat_body(64), [0.0, 0.0], []
        for index in range(rounds):
            rps = [0.0, 0.0]
            for which in ((0, 1) if index % 2 == 0 else (1, 0)):
                pids = stack_pids(stacks[which])
                before = cpu_reading(pids)
                load = wrk(f"{stacks[which].url}/v1/chat/completions", body, 16, seconds, work,
                           key if which else "")
                after = cpu_reading(pids)
                if load.errors:
                    raise RuntimeError(f"{load.errors} failed requests in the {other.stem} run")
                rps[which] = load.rps
                served[which] += load.requests
                for name in before:
                    spent[which][name] = spent[which].get(name, 0.0) + after[name] - before[name]
            totals = [totals[0] + rps[0], totals[1] + rps[1]]
            out.append((f"round {index + 1}", rps[1] / rps[0]))
        out.append(("all", totals[1] / totals[0]))
        return out, [{name: cpu * 1e6 / max(served[which], 1) for name, cpu in spent[which].items()}
                     for which in (0, 1)]
    finally:
        for stack in stacks:
            stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="ext_proc worker counts")
    parser.add_argument("--client-keys", type=int, default=0,
                        help="also compare x1 with this many client keys declared to x1 without (e.g. 100)")
    parser.add_argument("--providers", type=int, default=1,
                        help="identical providers in the routed stacks' policy, all on the fast upstream")
    parser.add_argument("--provider-scaling", type=int, nargs=2, metavar=("A", "B"),
                        help="also compare x1 with B providers to x1 with A (e.g. 4 50)")
    parser.add_argument("--no-accounting-run", action="store_true",
                        help="skip the run with usage accounting and audit logging off")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("bench needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="gpu-router-bench-"))
    cpu: dict[str, dict[str, float]] = {}
    """Per path at 16 connections: process -> CPU microseconds per request."""
    upstream_port, direct_port = free_port(), free_port()
    children = [fast_upstream(work, upstream_port)]
    try:
        children.append(direct_envoy(work, direct_port, upstream_port))
        small, large = chat_body(64), chat_body(200 * 1024)
        direct_url = f"http://127.0.0.1:{direct_port}/v1/chat/completions"
        direct_pids = {"envoy": children[1].pid, "upstream": children[0].pid}
        before = cpu_reading(direct_pids)
        direct_16 = wrk(direct_url, small, 16, args.duration, work)
        cpu["direct"] = per_request(before, cpu_reading(direct_pids), direct_16)
        rows = [("direct", "1 conn", wrk(direct_url, small, 1, args.duration, work)),
                ("direct", "16 conn", direct_16),
                ("direct", "1 conn 200KB", wrk(direct_url, large, 1, args.duration, work))]
        base = {label: load for _, label, load in rows}
        floor_port = free_port()
        floor = floor_stack(work, floor_port, upstream_port)
        children += floor
        floor_url = f"http://127.0.0.1:{floor_port}/v1/chat/completions"
        floor_pids = {"envoy": floor[1].pid, "ext_proc": floor[0].pid, "upstream": children[0].pid}
        before = cpu_reading(floor_pids)
        floor_16 = wrk(floor_url, small, 16, args.duration, work)
        cpu["floor"] = per_request(before, cpu_reading(floor_pids), floor_16)
        rows += [("floor", "1 conn", wrk(floor_url, small, 1, args.duration, work)), ("floor", "16 conn", floor_16)]
        for process in floor:
            process.stop()
        floors = {label: load for name, label, load in rows if name == "floor"}
        policy = bench_policy(work / "policy.yaml", upstream_port, providers=args.providers)
        timings = {}
        runs = [(f"routed x{w}", w, True) for w in args.workers]
        if not args.no_accounting_run:
            runs.append(("x1 acct off", 1, False))
        if args.client_keys:
            key_ratios, _ = ab_ratios(work, policy, bench_policy(
                work / "keyed.yaml", upstream_port, args.client_keys), args.duration, BENCH_KEY)
        if args.provider_scaling:
            fewer, more = args.provider_scaling
            scaling, scaling_cpu = ab_ratios(
                work, bench_policy(work / f"providers-{fewer}.yaml", upstream_port, providers=fewer),
                bench_policy(work / f"providers-{more}.yaml", upstream_port, providers=more),
                args.duration)
        for name, workers, accounting in runs:
            log_dir = work / name.replace(" ", "-")
            flags = (["--ledger", str(log_dir / "ledger.db")]  # the audit trail is read from it
                     if accounting else ["--no-accounting"])
            stack = Stack(policy=policy, log_dir=log_dir, ports=StackPorts.free(), accounting=flags,
                          ext_proc_workers=workers, simulators=False).start()
            try:
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
            finally:
                stack.stop()
    finally:
        for child in children:
            child.stop()

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
    print("\next_proc's own time per request (Envoy's ext_proc filter, via /metrics):")
    for name, text in timings.items():
        print(f"  {name:<28} {text}")
    print("\nCPU microseconds per request at 16 connections, per process (2 cores give 2e6 per second):")
    for name, spent in cpu.items():
        parts = ", ".join(f"{process} {us:.0f}" for process, us in spent.items())
        print(f"  {name:<12} {parts}; total {sum(spent.values()):.0f} -> at most {2e6 / sum(spent.values()):.0f} req/s")
    names = {name for name, _, _ in rows}
    if {"x1 acct off", "routed x1"} <= names:
        loads = {(name, label): load for name, label, load in rows}
        print("\nusage accounting (ledger, audit trail) on vs off (one ext_proc process):")
        for label in ("1 conn", "16 conn", "1 conn 200KB"):
            on, off = loads[("routed x1", label)], loads[("x1 acct off", label)]
            print(f"  {label:<14} rps on/off {on.rps / off.rps:5.2f}   p50 added {on.p50_ms - off.p50_ms:+.3f} ms")
    if args.client_keys:
        print(f"\nclient key check, {args.client_keys} keys declared vs no clients (x1, 16 conn, "
              "the two stacks loaded in turn, ABBA):")
        for label, ratio in key_ratios:
            print(f"  {label:<10} rps keys/no-keys {ratio:5.3f}")
    if args.provider_scaling:
        print(f"\n{more} providers vs {fewer} (x1, 16 conn, accounting off, loaded in turn, ABBA):")
        for label, ratio in scaling:
            print(f"  {label:<10} rps {more}/{fewer} {ratio:5.3f}")
        for count, spent in zip((fewer, more), scaling_cpu):
            parts = ", ".join(f"{process} {us:.0f}" for process, us in spent.items())
            print(f"  CPU us per request, {count} providers: {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
