"""The reconciler books from the edges' durable logs exactly the requests the ledger lacks,
remembers how far it got with the rows it booked, and frees what it has reconciled."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from control_plane.accounting import Accounting
from control_plane.ledger.reconcile import Reconciler, read_chunk
from control_plane.ledger.store import LogOffset, open_ledger, read_rows
from control_plane.metrics import Metrics
from control_plane.telemetry.edge_file import entry_from_line


def line(request_id: str, *, start_us: int | None = None, status: int = 200) -> bytes:
    fields = {
        "request_id": request_id, "log_type": "DownstreamEnd",
        "start_us": str(start_us if start_us is not None else int(time.time() * 1_000_000)),
        "status": status, "cluster": "lambda", "attempts": 1, "first_tx_ns": 1_500_000,
        "last_tx_ns": 9_250_000, "request_bytes": 95, "response_bytes": 300,
        "decision": {"model": "llama-3.1-8b", "policy": "interactive", "strategy": "latency"},
        "request": {"stream": False}, "usage": None, "ext_proc_us": "800",
    }
    return json.dumps(fields).encode() + b"\n"


def ledger_ids(path: Path) -> list[str]:
    with open_ledger(path) as connection:
        return sorted(row.request_id for row in read_rows(connection))


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.logs = tmp_path / "logs"
        self.logs.mkdir(exist_ok=True)
        self.ledger = tmp_path / "ledger.db"
        self.edge = self.logs / "edge-1.access.jsonl"
        self.start()

    def start(self) -> None:
        """A control-plane process: its accounting and reconciler."""
        self.metrics = Metrics()
        self.accounting = Accounting(self.metrics, self.ledger, None)
        self.reconciler = Reconciler(self.logs, self.ledger, self.accounting, self.metrics)

    def stop(self) -> None:
        self.accounting.close()
        self.reconciler.close()

    def append(self, *lines: bytes) -> None:
        with self.edge.open("ab") as file:
            file.write(b"".join(lines))

    def reconcile(self) -> None:
        asyncio.run(self.reconciler.reconcile_once())

    def reconciled(self) -> float:
        return self.metrics.reconciled.value(("edge-1",))


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def test_only_requests_the_gRPC_path_missed_are_booked(setup: Setup) -> None:
    setup.append(line("a"), line("b"), line("c"))
    assert setup.accounting.book(entry_from_line(line("b")), "edge-1")  # came over ALS
    setup.reconcile()
    setup.reconcile()
    assert setup.reconciled() == 2
    assert not setup.accounting.book(entry_from_line(line("a")), "edge-1"), "ALS comes late"
    setup.stop()
    assert ledger_ids(setup.ledger) == ["a", "b", "c"]


def test_a_restarted_control_plane_books_nothing_twice(setup: Setup) -> None:
    setup.append(line("a"), line("b"))
    setup.reconcile()
    setup.stop()
    setup.append(line("c"))
    setup.start()
    setup.reconcile()
    setup.stop()
    assert setup.reconciled() == 1  # only "c", past the committed offset
    assert ledger_ids(setup.ledger) == ["a", "b", "c"]


def test_a_request_an_earlier_process_booked_is_found_by_its_start_time_and_id(
        setup: Setup) -> None:
    """No offset committed yet and nothing in this process's memory: only the ledger's key,
    the start time and id the file's line and the gRPC log's entry share, says "b" is booked."""
    booked = line("b")
    setup.append(line("a"), booked)
    assert setup.accounting.book(entry_from_line(booked), "edge-1")  # came over ALS
    setup.stop()
    setup.start()
    setup.reconcile()
    setup.stop()
    assert setup.reconciled() == 1  # "a" only
    assert ledger_ids(setup.ledger) == ["a", "b"]


def test_rows_lost_with_the_last_batch_are_booked_from_the_file(setup: Setup) -> None:
    """What a SIGKILL leaves: the ALS path had booked "a" but its batch never committed."""
    setup.append(line("a"), line("b"))
    assert setup.accounting.book(entry_from_line(line("a")), "edge-1")
    setup.accounting = Accounting(setup.metrics, setup.ledger, None)  # the old one is "dead"
    setup.reconciler = Reconciler(setup.logs, setup.ledger, setup.accounting, setup.metrics)
    setup.reconcile()
    setup.stop()
    assert ledger_ids(setup.ledger) == ["a", "b"]


def test_a_request_older_than_the_retention_is_not_booked_again(setup: Setup) -> None:
    setup.append(line("ancient", start_us=1_000_000), line("recent"))
    setup.reconcile()
    setup.stop()
    assert ledger_ids(setup.ledger) == ["recent"]


def test_a_partial_line_waits_and_a_rotated_file_is_read_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "edge-1.access.jsonl"
    whole, partial = line("a"), line("b")
    path.write_bytes(whole + partial[:10])
    chunk = read_chunk(path, None)
    assert ([e.request.request_id for e in chunk.entries], chunk.end) == (["a"], len(whole))
    committed = LogOffset(path=str(path), inode=chunk.inode, offset=chunk.end)
    with path.open("ab") as file:
        file.write(partial[10:] + b"not json\n")
    chunk = read_chunk(path, committed)
    assert [e.request.request_id for e in chunk.entries] == ["b"]  # the bad line is skipped
    path.rename(tmp_path / "rotated")
    path.write_bytes(line("c"))
    chunk = read_chunk(path, committed)
    assert (chunk.start, [e.request.request_id for e in chunk.entries]) == (0, ["c"])


def test_the_reconciled_prefix_is_freed_while_offsets_stay(setup: Setup) -> None:
    setup.append(*(line(f"r{index}") for index in range(200)))  # ~80 KiB
    size = setup.edge.stat().st_size
    blocks = setup.edge.stat().st_blocks
    setup.reconcile()
    setup.stop()  # commits the rows, then the offset
    setup.start()
    setup.append(line("late"))
    setup.reconcile()  # frees the committed prefix, reads on from the offset
    setup.stop()
    stat = setup.edge.stat()
    assert stat.st_size > size and stat.st_blocks < blocks / 4
    assert setup.reconciled() == 1 and len(ledger_ids(setup.ledger)) == 201
    with setup.edge.open("rb") as file:
        file.seek(size)
        assert json.loads(file.readline())["request_id"] == "late"


def test_lines_this_process_booked_are_skipped_unparsed(tmp_path: Path) -> None:
    """As Envoy writes them (compact JSON; today's decision carries no id, an older ext_proc's
    repeated it)."""
    def compact(request_id: str, decision_id: str | None = None) -> bytes:
        fields = json.loads(line(request_id))
        fields["decision"].pop("request_id", None)
        if decision_id is not None:
            fields["decision"]["request_id"] = decision_id
        return json.dumps(fields, separators=(",", ":"), sort_keys=True).encode() + b"\n"

    path = tmp_path / "edge-1.access.jsonl"
    path.write_bytes(compact("a", "a") + compact("b", "b") + compact("c", "other") + b"{broken\n"
                     + compact("d") + compact("e"))

    chunk = read_chunk(path, None, booked={"b", "c", "d"})

    # b and d are skipped; c names two ids, so it is read (and booking finds it booked).
    assert [e.request.request_id for e in chunk.entries] == ["a", "c", "e"]
    assert chunk.end == path.stat().st_size
