"""What a booked row costs the ledger's writer as the ledger grows: keyed as it is (the request's
start time, then its id) against keyed as it was before schema 8 (the id alone, a random UUID).

For each size, a synthetic ledger (ledger_scale.fill: rows over the last 30 days, random ids)
is made once per key; then ROWS new requests, started now and a millisecond apart, go through
LedgerWriter as the control plane books them (batches of 200, each one transaction with its
rollups). Prints the process CPU per row for each key and their ratio, per size.

    python bench/ledger_write.py                # 0 and 1,000,000 rows already booked
    python bench/ledger_write.py 0 200000 1000000
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import get_type_hints

from ledger_scale import fill

from control_plane.ledger.store import LedgerRow, LedgerWriter, open_ledger

ROWS = 20_000
_DEFAULTS = {int: 0, float: 0.0, str: "", bool: False}


def keyed_by_id_alone(path: Path) -> None:
    """The indexes schema 7 had: a unique one on the request id and one on the start time."""
    with sqlite3.connect(path) as connection:
        connection.execute("DROP INDEX requests_at")
        connection.execute("CREATE UNIQUE INDEX requests_request_id ON requests (request_id)")
        connection.execute("CREATE INDEX requests_at ON requests (at_unix_ms)")


def new_rows(now_ms: int) -> list[LedgerRow]:
    base = {name: _DEFAULTS[kind] for name, kind in get_type_hints(LedgerRow).items()}
    base.update(model="llama-3.1-8b", provider="lambda", policy="interactive",
                strategy="latency", reason="fastest", attempts=1, status=200, ttfb_ms=42.0,
                total_ms=180.0, reported_tokens='{"completion_tokens":64,"prompt_tokens":420}',
                input_tokens=420, output_tokens=64, cost_usd=0.00012,
                candidates="lambda=61;coreweave=48", path="/v1/chat/completions",
                request_bytes=1800, max_tokens=64)
    return [LedgerRow(**{**base, "at_unix_ms": now_ms + index, "request_id": str(uuid.uuid4())})
            for index in range(ROWS)]


def cpu_per_row(path: Path, rows: list[LedgerRow]) -> float:
    """Process CPU microseconds per row, the writer's thread included, from the first add to
    the last commit."""
    writer = LedgerWriter(path)
    started = time.process_time()
    for row in rows:
        writer.add(row)
    writer.close()
    return (time.process_time() - started) * 1e6 / len(rows)


def main(sizes: list[int]) -> None:
    print(f"CPU per booked row ({ROWS:,} rows through LedgerWriter), by rows already booked:")
    for size in sizes:
        spent = {}
        for key in ("start time, id", "id alone"):
            with tempfile.TemporaryDirectory(prefix="ledger-write-") as directory:
                path = Path(directory) / "ledger.db"
                now_ms = int(time.time() * 1000)
                if size:
                    fill(path, size, now_ms)
                else:
                    open_ledger(path).close()
                if key == "id alone":
                    keyed_by_id_alone(path)
                spent[key] = cpu_per_row(path, new_rows(now_ms))
        print(f"  {size:>10,}  keyed by start time, id {spent['start time, id']:5.1f} us   "
              f"by id alone {spent['id alone']:5.1f} us   "
              f"ratio {spent['start time, id'] / spent['id alone']:.2f}", flush=True)


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [0, 1_000_000])
