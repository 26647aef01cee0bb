"""Months of ledger: time and peak memory of `gpu-router report`, `savings` and `replay` over
synthetic ledgers of 1M and 10M rows.

Each ledger spans 30 days ending now (1M rows = 0.4 req/s, 10M = 3.9 req/s) over the default
policy's three chat models: llama-3.1-8b on its four providers, mixtral-8x7b and llama-3.1-70b
on two, with ext_proc-style candidate summaries, body sizes and max_tokens drawn per row, 1 %
503s, 0.5 % 429s and 0.5 % requests that never reached a provider; plus a health history of
one row per provider and model every 10 s (3.1M rows). The rows are generated inside SQLite
(a recursive CTE, journal off for the fill only) in a temp dir that is deleted afterwards.
Each command runs in its own process; its peak RSS is that child's ru_maxrss.

    python bench/ledger_scale.py            # 1M and 10M
    python bench/ledger_scale.py 1000000    # one size
    python bench/ledger_scale.py 10000000 --only report,savings
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from control_plane.ledger import rollup
from control_plane.ledger.health_history import HISTORY_COLUMNS
from control_plane.ledger.store import COLUMNS, open_ledger

DAY_MS = 86_400_000
WINDOW_DAYS = 30
HISTORY_STEP_MS = 10_000
OFFERINGS = {  # model -> [(provider, base EWMA ms)] in the default policy's order
    "llama-3.1-8b": [("lambda", 60.0), ("coreweave", 45.0), ("vast", 180.0), ("runpod", 90.0)],
    "mixtral-8x7b": [("lambda", 60.0), ("runpod", 90.0)],
    "llama-3.1-70b": [("lambda", 60.0), ("coreweave", 45.0)],
}
COMMANDS = {
    "report": ["report", "--since", "30d"],
    "savings": ["savings", "--since", "30d"],
    "replay": ["replay", "--since", "30d"],
}


def _case(values: list[str], selector: str) -> str:
    arms = " ".join(f"WHEN {i} THEN {value}" for i, value in enumerate(values))
    return f"(CASE {selector} {arms} END)"


def fill(path: Path, rows: int, now_ms: int, days: int = WINDOW_DAYS) -> None:
    """A ledger of `rows` requests over the last `days` and its health history."""
    open_ledger(path).close()
    connection = open_ledger(path)
    connection.execute("PRAGMA journal_mode=OFF")
    connection.execute("PRAGMA synchronous=OFF")
    start = now_ms - days * DAY_MS
    pairs = [(m, p) for m, offers in OFFERINGS.items() for p, _ in offers]
    pick = f"(x * 7919 % {len(pairs)})"
    models = _case([f"'{m}'" for m, _ in pairs], pick)
    providers = _case([f"'{p}'" for _, p in pairs], pick)
    summaries = _case([f"'{';'.join(f'{q}={ms:g}' for q, ms in OFFERINGS[m])}'" for m, _ in pairs],
                      pick)
    values = {
        "at_unix_ms": f"{start} + x * {days * DAY_MS} / {rows}",
        "request_id": "lower(hex(randomblob(16)))",  # random, as Envoy's UUIDs
        "model": models,
        "provider": f"(CASE WHEN x % 200 = 7 THEN '' ELSE {providers} END)",
        "policy": "'interactive'", "strategy": "'latency'", "reason": "'fastest'",
        "attempts": "(CASE WHEN x % 100 = 3 THEN 2 ELSE 1 END)",
        "status": "(CASE WHEN x % 200 = 7 THEN 404 WHEN x % 100 = 5 THEN 503 "
                  "WHEN x % 200 = 9 THEN 429 ELSE 200 END)",
        "stream": "x % 2", "ttfb_ms": "20 + abs(random() % 100)",
        "total_ms": "exp(3.5 + abs(random() % 2000) / 1000.0)",
        "reported_tokens": "'{}'", "input_tokens": "abs(random() % 2000)",
        "output_tokens": "abs(random() % 500)", "cached_input_tokens": "abs(random() % 200)",
        "cache_write_tokens": "0", "reasoning_tokens": "0", "estimated": "0",
        "estimate_reason": "''", "cost_usd": "abs(random() % 1000) / 1e6",
        "client": "''", "client_request_id": "''", "candidates": summaries,
        "fallbacks": "''", "path": "'/v1/chat/completions'",
        "request_bytes": "200 + abs(random() % 8000)",
        "max_tokens": "(CASE x % 5 WHEN 0 THEN -1 ELSE 64 * (x % 5) END)",
    }
    assert set(values) == set(COLUMNS), set(COLUMNS) ^ set(values)
    with connection:
        connection.execute(
            f"INSERT INTO requests ({', '.join(COLUMNS)}) WITH RECURSIVE c(x) AS (SELECT 0 "
            f"UNION ALL SELECT x + 1 FROM c WHERE x + 1 < {rows}) "
            f"SELECT {', '.join(values[name] for name in COLUMNS)} FROM c")
        keys = [(p, m, ms) for m, offers in OFFERINGS.items() for p, ms in offers]
        keys += [(p, "", ms) for p, ms in {p: ms for offers in OFFERINGS.values()
                                             for p, ms in offers}.items()]
        ticks = days * DAY_MS // HISTORY_STEP_MS
        for provider, model, base in keys:
            history = {
                "at_unix_ms": f"{start} + x * {HISTORY_STEP_MS}", "provider": f"'{provider}'",
                "model": f"'{model}'", "ewma_ms": f"{base} * (0.8 + abs(random() % 400) / 1000.0)",
                "ttfb_ms": f"{base / 2}", "error_rate": "0.0", "rate_429": "0.0",
                "state": "(CASE WHEN x % 5000 = 11 THEN 'ejected' ELSE 'healthy' END)",
                "ejected_until": f"(CASE WHEN x % 5000 = 11 THEN {start} + x * "
                                 f"{HISTORY_STEP_MS} + 10000 ELSE 0 END)",
                "reason": "''",
            }
            connection.execute(
                f"INSERT INTO health_history ({', '.join(HISTORY_COLUMNS)}) WITH RECURSIVE "
                f"c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c WHERE x + 1 < {ticks}) "
                f"SELECT {', '.join(history[name] for name in HISTORY_COLUMNS)} FROM c")
        rollup.rebuild(connection)  # the writer rolls up what it inserts; this fill bypasses it
    connection.close()


def measure(ledger: Path, command: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, last output line) of `gpu-router <command>` in a child."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen([str(Path(sys.executable).parent / "gpu-router"), *command, "--ledger",
                                  str(ledger)], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        elapsed = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if child.returncode != 0:
            raise RuntimeError(f"{command} failed: {err.read()}")
        lines = [line for line in out.read().splitlines() if line.strip()]
    peak_kb = usage.ru_maxrss
    return elapsed, peak_kb / 1024, next((line for line in lines if "changed" in line), "")


def main(sizes: list[int], only: list[str]) -> None:
    for rows in sizes:
        with tempfile.TemporaryDirectory(prefix="ledger-scale-") as directory:
            ledger = Path(directory) / "ledger.db"
            started = time.perf_counter()
            fill(ledger, rows, int(time.time() * 1000))
            size_mb = ledger.stat().st_size / 1e6
            print(f"{rows:,} rows: filled in {time.perf_counter() - started:.1f} s, "
                  f"{size_mb:,.0f} MB on disk", flush=True)
            for name in only:
                command = COMMANDS[name]
                seconds, peak_mb, note = measure(ledger, command)
                print(f"  {name:<8} {seconds:7.1f} s  peak RSS {peak_mb:6.0f} MB  {note}",
                      flush=True)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    chosen = list(COMMANDS)
    if "--only" in arguments:
        at = arguments.index("--only")
        chosen = arguments[at + 1].split(",")
        del arguments[at:at + 2]
    main([int(arg) for arg in arguments] or [1_000_000, 10_000_000], chosen)
