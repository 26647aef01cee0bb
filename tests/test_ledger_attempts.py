"""Failed upstream attempts in the ledger's database (attempts.py): written through the batched
writer, read back in the order they started, pruned with the requests' retention; a ledger of
the previous schema version gains the table when opened; `why` tells each attempt's real
outcome from them, and infers (saying so) only when a request has none."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf.descriptor import FieldDescriptor
from usage_fixtures import make_record

from control_plane.ledger.attempts import FLAG_MEANINGS, FLAG_NAMES, AttemptRow, attempts_of
from control_plane.ledger.store import SCHEMA_VERSION, LedgerWriter, ledger_row, open_ledger
from control_plane.ledger.why import explain, render_why
from control_plane.policy.load import default_policy_path, load_policy_file
from control_plane.telemetry.response_flags import UPSTREAM_FAILURE_FLAGS
from control_plane.translate.listeners import FAILED_ATTEMPT_FLAGS
from control_plane.usage.normalise import normalise

T0 = 1_700_000_000_000
DAY_S = 86_400
POLICY = load_policy_file(default_policy_path())


def attempt(request_id: str, at_ms: int, provider: str, status: int = 503, flags: str = "",
            duration_ms: float = 12.0) -> AttemptRow:
    return AttemptRow(request_id=request_id, at_unix_ms=at_ms, provider=provider, status=status,
                      flags=flags, duration_ms=duration_ms)


def write(path: Path, *items: object, clock_s: float = T0 / 1000) -> None:
    """Through the writer as the control plane does (its clock at T0: nothing pruned)."""
    writer = LedgerWriter(path, clock=lambda: clock_s)
    for item in items:
        if isinstance(item, AttemptRow):
            writer.add_attempt(item)
        else:
            record = make_record(**item)  # type: ignore[arg-type]
            writer.add(ledger_row(record, normalise(record, "openai"), 0.0))
    writer.close()


def test_the_flag_tables_follow_envoy_and_the_attempt_log_filter() -> None:
    """FLAG_NAMES is typed from Envoy's docs: a ResponseFlags field it lacks would be dropped
    from every row; FLAG_MEANINGS explains exactly the flags the edges log an attempt for, which
    are the ones health counts as the provider's failure."""
    booleans = {f.name for f in accesslog_pb2.ResponseFlags.DESCRIPTOR.fields
                if f.type == FieldDescriptor.TYPE_BOOL}
    assert set(FLAG_NAMES) == booleans
    assert set(FLAG_MEANINGS) == set(FAILED_ATTEMPT_FLAGS) <= set(FLAG_NAMES.values())
    assert {FLAG_NAMES[name] for name in UPSTREAM_FAILURE_FLAGS} == set(FAILED_ATTEMPT_FLAGS)


def test_attempts_are_written_in_batches_and_read_back_in_start_order(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    late = attempt("req-1", T0 + 40, "lambda", status=0, flags="UT", duration_ms=1000.4)
    early = attempt("req-1", T0 + 2, "coreweave")
    write(path, late, attempt("req-2", T0 + 1, "vast"), early)
    with open_ledger(path) as connection:
        assert attempts_of(connection, "req-1") == [early, late]
        assert attempts_of(connection, "nobody") == []


def test_attempts_older_than_the_retention_are_pruned_with_the_requests(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    write(path, attempt("old", T0, "coreweave"), attempt("kept", T0 + 5 * DAY_S * 1000, "vast"))
    LedgerWriter(path, retention_days=10, clock=lambda: T0 / 1000 + 11 * DAY_S).close()
    with open_ledger(path) as connection:
        assert attempts_of(connection, "old") == []
        assert [a.provider for a in attempts_of(connection, "kept")] == ["vast"]


def test_a_previous_version_ledger_gains_the_attempts_table(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    write(path, {"request_id": "before", "at_unix_ms": T0})
    with sqlite3.connect(path) as old:  # as version 6 left it
        old.execute("DROP TABLE attempts")
        old.execute(f"PRAGMA user_version={SCHEMA_VERSION - 1}")
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as unread:
        assert attempts_of(unread, "before") == [], "why reads an old ledger without upgrading"
    write(path, attempt("after", T0 + 1, "runpod"))
    with open_ledger(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert [a.provider for a in attempts_of(connection, "after")] == ["runpod"]
        assert connection.execute("SELECT count(*) FROM requests").fetchone()[0] == 1


FAILED_OVER = {"request_id": "req-f", "at_unix_ms": T0, "model": "llama-3.1-8b",
               "candidates": "coreweave=55.5;lambda=68.6;runpod=95.6;vast=240",
               "fallbacks": ("lambda", "runpod", "vast"), "provider": "runpod", "attempts": 3,
               "status": 200}


def test_why_tells_each_attempt_s_real_outcome_in_start_order(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    write(path, FAILED_OVER, attempt("req-f", T0 + 900, "lambda", 0, "UT", 1000.2),
          attempt("req-f", T0 + 3, "coreweave", 503, "", 12.3))

    story = explain(path, POLICY, "req-f")

    assert not story["attempts_inferred"]
    assert story["attempts_detail"] == [
        {"attempt": 1, "provider": "coreweave", "status": 503, "flags": [], "duration_ms": 12.3,
         "outcome": "503 after 12 ms: retried on the next"},
        {"attempt": 2, "provider": "lambda", "status": 0, "flags": ["UT"], "duration_ms": 1000.2,
         "outcome": "timed out (UT) after 1000 ms: retried on the next"},
        {"attempt": 3, "provider": "runpod", "status": 200, "flags": [], "duration_ms": None,
         "outcome": "answered 200"},
    ]
    text = render_why(story)
    assert "  attempts:\n" in text
    assert "   1. coreweave    503 after 12 ms: retried on the next" in text
    assert "   3. runpod       answered 200" in text


def test_why_tells_a_failed_last_attempt_and_one_the_log_lost(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    write(path, {**FAILED_OVER, "status": 503},
          attempt("req-f", T0 + 1, "coreweave", 0, "UF", 2.0),
          attempt("req-f", T0 + 50, "runpod", 503, "URX", 8.0))

    outcomes = [(a["provider"], a["outcome"])
                for a in explain(path, POLICY, "req-f")["attempts_detail"]]

    assert outcomes == [("coreweave", "connection failed (UF) after 2 ms: retried on the next"),
                        ("", "failed: not in the attempt log"),
                        ("runpod", "503, retries exhausted (URX) after 8 ms: the client got 503")]


def test_why_infers_from_the_route_order_and_says_so_when_no_attempt_was_logged(
        tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    write(path, {**FAILED_OVER, "attempts": 2, "provider": "lambda"})

    story = explain(path, POLICY, "req-f")

    assert story["attempts_inferred"]
    assert [(a["provider"], a["outcome"], a["status"]) for a in story["attempts_detail"]] == [
        ("coreweave", "failed: retried on the next", None), ("lambda", "answered 200", 200)]
    assert "  attempts (inferred from the route order: no attempt logged):" in render_why(story)
