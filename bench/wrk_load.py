"""Load from wrk and the CPU time it cost each process: what every benchmark here measures with.

A shared 2-core machine drifts within minutes, so comparisons are loaded in turn (`interleaved`):
each target in forward then reverse order per round, so a drift weighs on every target alike.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Load:
    p50_ms: float
    p99_ms: float
    rps: float
    errors: int
    requests: int
    error_kinds: str = ""
    """wrk's count of each kind of failure (connect, read, write, status >= 400, timeout)."""


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
%s
local f = io.open("%s", "rb"); wrk.body = f:read("*a"); f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT {\\"p50\\":%%d,\\"p99\\":%%d,\\"requests\\":%%d,\\"duration\\":%%d,\\"errors\\":%%d,\\"kinds\\":\\"connect %%d, read %%d, write %%d, status %%d, timeout %%d\\"}\\n",
    latency:percentile(50), latency:percentile(99), summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout, e.connect, e.read, e.write, e.status,
    e.timeout))
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
                result["requests"] / (result["duration"] / 1e6), result["errors"], result["requests"],
                result["kinds"])


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


def host_ticks() -> tuple[int, int]:
    """(steal, all) CPU ticks of the machine so far (/proc/stat): on a VM, the hypervisor's
    steal is time the machine's CPUs were not ours, which no process's CPU time shows."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:]]
    return ticks[7], sum(ticks[:8])  # user nice system idle iowait irq softirq steal


def per_request(before: dict[str, float], after: dict[str, float], load: Load) -> dict[str, float]:
    """Microseconds of CPU per request each process spent between two readings."""
    return {name: (after[name] - before[name]) * 1e6 / max(load.requests, 1) for name in before}


def wrk_with_cpu(url: str, body: bytes, connections: int, seconds: int, work: Path,
                 pids: dict[str, int]) -> tuple[Load, dict[str, float]]:
    """wrk's load, and the CPU microseconds per request each of `pids` (and wrk) spent on it."""
    before = cpu_reading(pids)
    load = wrk(url, body, connections, seconds, work)
    return load, per_request(before, cpu_reading(pids), load)


@dataclass(frozen=True)
class Target:
    """What one comparison loads: a URL, the processes whose CPU counts, the key sent (if any)."""

    name: str
    url: str
    pids: dict[str, int]
    key: str = ""


@dataclass
class Interleaved:
    """Each target's req/s per round, and its CPU per request per process over all rounds."""

    rps: dict[str, list[float]] = field(default_factory=dict)
    cpu_us: dict[str, dict[str, float]] = field(default_factory=dict)
    steal: dict[str, list[float]] = field(default_factory=dict)
    """Per target per round, the share of the machine's CPU time the hypervisor took."""

    def ratio(self, over: str, under: str) -> float:
        """Total req/s of `over` over that of `under`, all rounds."""
        return sum(self.rps[over]) / sum(self.rps[under])

    def round_ratios(self, over: str, under: str) -> list[float]:
        return [a / b for a, b in zip(self.rps[over], self.rps[under], strict=True)]


def interleaved(targets: list[Target], body: bytes, connections: int, seconds: int, work: Path,
                rounds: int = 2) -> Interleaved:
    """Load the targets in turn, forward then reverse per round (A B C, C B A, ...), so that a
    drift of the shared machine weighs on all alike. Raises when any request failed."""
    out = Interleaved({t.name: [] for t in targets}, {}, {t.name: [] for t in targets})
    spent: dict[str, dict[str, float]] = {t.name: {} for t in targets}
    served = dict.fromkeys(spent, 0)
    for index in range(rounds):
        for target in (targets if index % 2 == 0 else targets[::-1]):
            before, (stolen, ticks) = cpu_reading(target.pids), host_ticks()
            load = wrk(target.url, body, connections, seconds, work, target.key)
            after, (stolen_after, ticks_after) = cpu_reading(target.pids), host_ticks()
            out.steal[target.name].append((stolen_after - stolen) / max(ticks_after - ticks, 1))
            if load.errors:
                raise RuntimeError(f"{load.errors} failed requests loading {target.name} "
                                   f"(round {index + 1}; {load.error_kinds})")
            out.rps[target.name].append(load.rps)
            served[target.name] += load.requests
            for process in before:
                spent[target.name][process] = (spent[target.name].get(process, 0.0)
                                               + after[process] - before[process])
    out.cpu_us = {name: {process: cpu * 1e6 / max(served[name], 1) for process, cpu in by.items()}
                  for name, by in spent.items()}
    return out
