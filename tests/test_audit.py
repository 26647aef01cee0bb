"""The routing audit trail: one complete JSON entry per request, decision then outcome, rendered
from the ledger on read (`gpu-router audit`) or written to the opt-in audit file."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest
from usage_fixtures import as_version_7, make_record

from control_plane.audit import AuditLog, audit_entry, audit_line, parse_candidates
from control_plane.ledger import audit_trail
from control_plane.ledger.audit_trail import TrailQuery, rows_after
from control_plane.ledger.report import read_only
from control_plane.ledger.store import LedgerRow, LedgerWriter, ledger_row
from control_plane.usage.normalise import normalise
from gpu_router.cli import main


def booked(cost: float = 0.0, usage_format: str = "openai", **changes: Any) -> LedgerRow:
    """The ledger row of a record made with `changes`, as Accounting books it."""
    record = make_record(**changes)
    return ledger_row(record, normalise(record, usage_format), cost)


def test_candidates_summary_is_parsed_in_rank_order() -> None:
    assert parse_candidates("vast=0.000070;runpod=0.000126;lambda=x:gpu too small") == [
        {"provider": "vast", "score": 0.00007}, {"provider": "runpod", "score": 0.000126},
        {"provider": "lambda", "excluded": "gpu too small"}]


def test_odd_candidate_summaries_never_raise() -> None:
    assert parse_candidates("") == []
    assert parse_candidates(" a=1 ;; b=oops;c;d=x:") == [
        {"provider": "a", "score": 1.0}, {"provider": "b", "unparsed": "oops"},
        {"provider": "c", "unparsed": ""}, {"provider": "d", "excluded": ""}]


def test_a_failed_over_request_names_choice_and_who_served() -> None:
    entry = audit_entry(booked(0.0000123, provider="runpod", attempts=2, status=200,
                               usage_format="anthropic",
                               usage_text='"usage":{"input_tokens":11,"output_tokens":5,'
                                          '"cache_read_input_tokens":3}'))
    assert entry["at"] == "2023-11-14T22:13:20.000+00:00"
    assert (entry["request_id"], entry["model"], entry["policy"], entry["strategy"]) == (
        "req-1", "llama-3.1-8b", "interactive", "latency")
    assert entry["choice"] == "coreweave"
    assert entry["fallbacks"] == ["runpod", "lambda"]
    assert entry["reason"] == "fastest: 42 ms EWMA"
    assert entry["candidates"][-1] == {"provider": "vast",
                                       "excluded": "gpu RTX-4090 (24 GB) too small"}
    outcome = entry["outcome"]
    assert (outcome["provider"], outcome["failed_over"], outcome["attempts"],
            outcome["status"]) == ("runpod", True, 2, 200)
    assert (outcome["ttfb_ms"], outcome["total_ms"], outcome["cost_usd"]) == (30.0, 55.0,
                                                                              0.0000123)
    assert outcome["tokens"] == {"input": 11, "output": 5, "cached_input": 3, "cache_write": 0,
                                 "reasoning": 0}
    assert outcome["reported"] == {"input_tokens": 11, "output_tokens": 5,
                                   "cache_read_input_tokens": 3}
    assert outcome["estimated"] is False


def test_no_decision_and_nobody_served() -> None:
    entry = audit_entry(booked(candidates="", reason="", fallbacks=(), provider="", status=503))
    assert (entry["choice"], entry["outcome"]["provider"], entry["outcome"]["failed_over"]) == (
        "", "", False)
    assert entry["outcome"]["estimated"] is True
    assert entry["fallbacks"] == []


def test_the_clients_request_id_is_its_own_field() -> None:
    entry = audit_entry(booked(client_request_id="client-7"))
    assert (entry["request_id"], entry["client_request_id"]) == ("req-1", "client-7")


def test_log_writes_one_json_line_per_request_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    for run in range(2):
        log = AuditLog(path)
        for index in range(3):
            log.add(booked(0.5, request_id=f"run{run}-{index}"))
        log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == [
        f"run{run}-{index}" for run in range(2) for index in range(3)]
    assert all(json.loads(line)["outcome"]["cost_usd"] == 0.5 for line in lines)


def test_log_rotates_by_size_and_keeps_the_newest_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=1, keep=2, max_batch=1)  # every line fills a file
    for index in range(4):
        log.add(booked(request_id=f"r{index}"))
    log.close()

    def ids(file: Path) -> list[str]:
        return [json.loads(line)["request_id"] for line in file.read_text().splitlines()]

    assert path.read_text() == ""
    assert (ids(log.rotated(1)), ids(log.rotated(2))) == (["r3"], ["r2"])
    assert not log.rotated(3).exists()


def test_a_line_below_the_size_limit_does_not_rotate(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=1 << 20, keep=2)
    log.add(booked(request_id="r0"))
    log.close()
    assert len(path.read_text().splitlines()) == 1 and not log.rotated(1).exists()


NOW_MS = int(time.time() * 1000)


def ledger_of(path: Path, rows: list[LedgerRow]) -> Path:
    writer = LedgerWriter(path)
    for row in rows:
        writer.add(row)
    writer.close()
    return path


def test_the_trail_read_from_the_ledger_is_the_files_entries_in_booking_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_trail, "PAGE_ROWS", 2)  # three pages
    rows = [booked(0.25, request_id=f"r{index}", at_unix_ms=NOW_MS - index * 1000,
                   client="team-a" if index % 2 else "") for index in range(5)]
    path = ledger_of(tmp_path / "ledger.db", rows)
    file = AuditLog(tmp_path / "audit.jsonl")
    for row in rows:
        file.add(row)
    file.close()
    with read_only(path) as connection:
        trail = list(rows_after(connection, TrailQuery(NOW_MS - 60_000)))
        assert [audit_line(row) for _, row in trail] == file.path.read_text().splitlines()
        assert [row.request_id for _, row in rows_after(
            connection, TrailQuery(NOW_MS - 2_500))] == ["r0", "r1", "r2"]
        assert [row.request_id for _, row in rows_after(
            connection, TrailQuery(0, client="team-a"))] == ["r1", "r3"]
        assert [row.request_id for _, row in rows_after(
            connection, TrailQuery(0), after_id=trail[2][0])] == ["r3", "r4"]


def test_the_trail_reads_a_ledger_the_control_plane_has_not_upgraded_yet(tmp_path: Path) -> None:
    """`gpu-router audit` of a new release over a version-7 ledger (keyed by the id alone), which
    it opens read-only: the start-time index it names is there under the same name."""
    path = ledger_of(tmp_path / "ledger.db", [booked(request_id=f"r{index}",
                                                     at_unix_ms=NOW_MS - index * 1000)
                                              for index in range(3)])
    as_version_7(path)
    with read_only(path) as connection:
        assert [row.request_id for _, row in rows_after(
            connection, TrailQuery(NOW_MS - 1_500))] == ["r0", "r1"]


def test_the_trail_starts_at_the_window_and_follows_rows_booked_later(tmp_path: Path) -> None:
    """The first page starts from the start-time index (older rows are not scanned), and a
    window nothing has started in yet still yields the rows booked into it afterwards, whatever
    their start time's place among the older rows' ids."""
    old = [booked(request_id=f"old{i}", at_unix_ms=NOW_MS - 7_200_000) for i in range(3)]
    path = ledger_of(tmp_path / "ledger.db", old)
    query = TrailQuery(NOW_MS - 60_000)
    with read_only(path) as connection:
        assert list(rows_after(connection, query)) == []
    ledger_of(path, [booked(request_id="new", at_unix_ms=NOW_MS),
                     booked(request_id="late-old", at_unix_ms=NOW_MS - 7_200_000)])
    with read_only(path) as connection:
        assert [row.request_id for _, row in rows_after(connection, query)] == ["new"]
        assert [row.request_id for _, row in rows_after(
            connection, TrailQuery(0))] == ["old0", "old1", "old2", "new", "late-old"]


def test_gpu_router_audit_prints_the_window_as_json_lines(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = ledger_of(tmp_path / "ledger.db", [
        booked(request_id="old", at_unix_ms=NOW_MS - 7_200_000),
        booked(request_id="new", at_unix_ms=NOW_MS, provider="runpod", attempts=2)])
    with pytest.raises(SystemExit) as done:
        main(["audit", "--ledger", str(path), "--since", "1h"])
    assert done.value.code == 0
    (line,) = capsys.readouterr().out.splitlines()
    entry = json.loads(line)
    assert (entry["request_id"], entry["choice"], entry["outcome"]["provider"],
            entry["outcome"]["failed_over"]) == ("new", "coreweave", "runpod", True)


@pytest.mark.parametrize(("args", "message"), [
    (["--since", "1h"], "no usage ledger at"),
    (["--since", "soon"], "invalid window 'soon'"),
])
def test_gpu_router_audit_names_what_is_wrong(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as done:
        main(["audit", "--ledger", str(tmp_path / "missing.db"), *args])
    assert done.value.code == 2
    assert message in capsys.readouterr().err


def line_within(stream: IO[str], seconds: float) -> str:
    """The next line of a child's output; fails (rather than hangs) when none comes in time."""
    assert select.select([stream], [], [], seconds)[0], f"no line within {seconds} s"
    return stream.readline()


def test_gpu_router_audit_follow_prints_each_request_once_as_it_is_booked(tmp_path: Path) -> None:
    path = ledger_of(tmp_path / "ledger.db", [booked(request_id="before", at_unix_ms=NOW_MS)])
    follow = subprocess.Popen(
        [sys.executable, "-c", "from gpu_router.cli import main; main()", "audit", "--follow",
         "--ledger", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        assert json.loads(line_within(follow.stdout, 30))["request_id"] == "before"
        ledger_of(path, [booked(request_id="after", at_unix_ms=NOW_MS)])
        assert json.loads(line_within(follow.stdout, 30))["request_id"] == "after"
        follow.send_signal(signal.SIGINT)
        assert follow.wait(timeout=30) == 0
        assert follow.stdout.read() == ""  # nothing printed twice
    finally:
        follow.kill()
        follow.wait()
