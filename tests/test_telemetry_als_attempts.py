"""Believed failed attempts reach the receiver's `on_attempt` hooks, and through Accounting the
ledger's attempts table; what validation drops never does."""

from __future__ import annotations

from pathlib import Path

from envoy.data.accesslog.v3 import accesslog_pb2
from test_telemetry_validation import NOW_MS, Counts, entry, message, receiver_for, stream

from control_plane.accounting import Accounting
from control_plane.ledger.attempts import AttemptRow, attempts_of
from control_plane.ledger.store import open_ledger
from control_plane.metrics import Metrics
from control_plane.telemetry.als import ATTEMPT_LOG_NAME
from control_plane.telemetry.health import FleetHealth
from control_plane.telemetry.samples import RequestSample


def timed_out(request_id: str, start_ms: int = NOW_MS - 1500) -> accesslog_pb2.HTTPAccessLogEntry:
    """A per-try timeout as the edge logs it: no status, UT, 1 s spent."""
    failed = entry(request_id, cluster="lambda", status=0, start_ms=start_ms, model="")
    failed.common_properties.duration.FromMilliseconds(1000)
    failed.common_properties.response_flags.upstream_request_timeout = True
    return failed


def test_believed_attempts_reach_the_ledger_and_dropped_ones_do_not(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    accounting = Accounting(Metrics(), path, None, clock=lambda: NOW_MS / 1000)
    seen: list[RequestSample] = []
    receiver = receiver_for(FleetHealth(), Counts())
    receiver.on_attempt += [lambda _entry, _sample: 1 / 0,  # a failing subscriber costs nothing
                            accounting.add_attempt, lambda _entry, sample: seen.append(sample)]
    refused = entry("r1", cluster="coreweave", status=503, start_ms=NOW_MS - 1600, model="")
    refused.common_properties.duration.FromMilliseconds(12)

    stream(receiver, message(ATTEMPT_LOG_NAME, [
        refused, timed_out("r1"), timed_out("future", start_ms=NOW_MS + 3_600_000),
        timed_out("")]))
    accounting.close()

    assert [s.request_id for s in seen] == ["r1", "r1", ""], "the future one is dropped"
    with open_ledger(path) as connection:
        assert attempts_of(connection, "r1") == [
            AttemptRow(request_id="r1", at_unix_ms=NOW_MS - 1600, provider="coreweave",
                       status=503, flags="", duration_ms=12.0),
            AttemptRow(request_id="r1", at_unix_ms=NOW_MS - 1500, provider="lambda",
                       status=0, flags="UT", duration_ms=1000.0)]
        assert connection.execute("SELECT count(*) FROM attempts").fetchone()[0] == 2

