"""The routing audit log: one complete JSON line per request, decision then outcome."""

from __future__ import annotations

import json
from pathlib import Path

from usage_fixtures import make_record

from control_plane.audit import AuditLog, audit_entry, parse_candidates
from control_plane.usage.normalise import normalise


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
    record = make_record(provider="runpod", attempts=2, status=200, usage_format="anthropic",
                         usage_text='"usage":{"input_tokens":11,"output_tokens":5,'
                                    '"cache_read_input_tokens":3}')
    entry = audit_entry(record, normalise(record), 0.0000123)
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
    record = make_record(candidates="", reason="", fallbacks=(), provider="", status=503)
    entry = audit_entry(record, normalise(record), 0.0)
    assert (entry["choice"], entry["outcome"]["provider"], entry["outcome"]["failed_over"]) == (
        "", "", False)
    assert entry["outcome"]["estimated"] is True


def test_the_clients_request_id_is_its_own_field() -> None:
    record = make_record(client_request_id="client-7")
    entry = audit_entry(record, normalise(record), 0.0)
    assert (entry["request_id"], entry["client_request_id"]) == ("req-1", "client-7")


def test_log_writes_one_json_line_per_request_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    for run in range(2):
        log = AuditLog(path)
        for index in range(3):
            record = make_record(request_id=f"run{run}-{index}")
            log.add(record, normalise(record), 0.5)
        log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == [
        f"run{run}-{index}" for run in range(2) for index in range(3)]
    assert all(json.loads(line)["outcome"]["cost_usd"] == 0.5 for line in lines)


def test_log_rotates_by_size_and_keeps_the_newest_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=1, keep=2, max_batch=1)  # every line fills a file
    for index in range(4):
        record = make_record(request_id=f"r{index}")
        log.add(record, normalise(record), 0.0)
    log.close()

    def ids(file: Path) -> list[str]:
        return [json.loads(line)["request_id"] for line in file.read_text().splitlines()]

    assert path.read_text() == ""
    assert (ids(log.rotated(1)), ids(log.rotated(2))) == (["r3"], ["r2"])
    assert not log.rotated(3).exists()


def test_a_line_below_the_size_limit_does_not_rotate(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=1 << 20, keep=2)
    record = make_record(request_id="r0")
    log.add(record, normalise(record), 0.0)
    log.close()
    assert len(path.read_text().splitlines()) == 1 and not log.rotated(1).exists()
