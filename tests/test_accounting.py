"""Accounting: an edge access-log entry becomes one booked request (ledger, audit, metrics)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2, wrappers_pb2

from control_plane.accounting import Accounting
from control_plane.metrics import Metrics
from control_plane.policy.load import default_policy_path, load_policy_file
from control_plane.telemetry.client_request import read_client_request, record_from_edge_entry
from control_plane.telemetry.validation import DEFAULT_LIMITS

USAGE = '"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}'


def struct(**fields: object) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(fields)
    return value


def edge_entry(**decision: object) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    common = entry.common_properties
    common.start_time.CopyFrom(timestamp_pb2.Timestamp(seconds=1_700_000_000))
    common.upstream_cluster = "lambda"
    common.upstream_request_attempt_count = 2
    common.time_to_first_downstream_tx_byte.CopyFrom(duration_pb2.Duration(nanos=40_000_000))
    common.time_to_last_downstream_tx_byte.CopyFrom(duration_pb2.Duration(nanos=90_000_000))
    metadata = common.metadata.filter_metadata
    metadata["gpu_router"].CopyFrom(struct(
        provider="lambda", model="llama-3.1-8b", policy="interactive", strategy="latency",
        reason="fastest: 40 ms EWMA", fallbacks="coreweave,vast",
        candidates="lambda=40;coreweave=55;vast=x:ejected", **decision))
    metadata["gpu_router.request"].CopyFrom(struct(model="llama3-8b", stream=True))
    metadata["gpu_router.usage"].CopyFrom(struct(text=USAGE))
    common.custom_tags["ext_proc_us"] = "350"
    entry.request.request_id = "req-7"
    entry.request.request_body_bytes = 48
    entry.response.response_code.CopyFrom(wrappers_pb2.UInt32Value(value=200))
    entry.response.response_body_bytes = 400
    return entry


def test_an_edge_entry_carries_the_decision_the_outcome_and_the_usage() -> None:
    record = record_from_edge_entry(edge_entry())

    assert record is not None
    assert (record.request_id, record.provider, record.model, record.attempts) == (
        "req-7", "lambda", "llama-3.1-8b", 2)
    assert record.fallbacks == ("coreweave", "vast")
    assert record.stream and record.usage_text == USAGE
    assert (record.ttfb_ms, record.total_ms, record.ext_proc_us) == (40.0, 90.0, 350)
    assert (record.request_bytes, record.response_bytes, record.status) == (48, 400, 200)
    assert record.client_request_id == ""


def test_the_clients_own_request_id_is_kept_apart_from_the_edges() -> None:
    entry = edge_entry()
    entry.common_properties.metadata.filter_metadata["gpu_router.request"].update(
        {"client_request_id": "mine-1"})
    record = record_from_edge_entry(entry)
    assert record is not None
    assert (record.request_id, record.client_request_id) == ("req-7", "mine-1")


def test_a_periodic_entry_is_not_a_request() -> None:
    entry = edge_entry()
    entry.common_properties.intermediate_log_entry = True

    assert record_from_edge_entry(entry) is None


def test_booking_prices_the_reported_tokens_into_ledger_audit_and_metrics(tmp_path: Path) -> None:
    accounting = Accounting(Metrics(), tmp_path / "ledger.db", tmp_path / "audit.jsonl")
    accounting.use_policy(load_policy_file(default_policy_path()))

    accounting.book(edge_entry(), "edge-1")
    accounting.close()

    (row,) = sqlite3.connect(tmp_path / "ledger.db").execute(
        "select request_id, provider, cost_usd from requests").fetchall()
    assert row[:2] == ("req-7", "lambda")
    assert row[2] == (12 * 0.25 + 5 * 0.25) / 1e6  # lambda's llama-3.1-8b: $0.25 per 1M each way
    (line,) = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert json.loads(line)["request_id"] == "req-7"
    assert accounting.metrics.cost.value(("lambda", "llama-3.1-8b")) == row[2]


def test_a_request_the_receiver_read_is_priced_as_the_ledgers_policy_says() -> None:
    accounting = Accounting(Metrics(), None, None)
    accounting.use_policy(load_policy_file(default_policy_path()))
    # The receiver reads no policy fact: lambda's usage format (openai) is the ledger's.
    read = read_client_request(edge_entry(), "edge-1", 1_700_000_001_000, DEFAULT_LIMITS)

    assert accounting.book_request(read)
    tokens = accounting.metrics.tokens
    assert tokens.value(("lambda", "llama-3.1-8b", "input")) == 12  # reported, not estimated
    assert accounting.metrics.estimated.value(("lambda", "llama-3.1-8b")) == 0


def test_an_entry_the_ledger_cannot_read_is_counted_not_booked() -> None:
    metrics = Metrics()
    accounting = Accounting(metrics, None, None)
    entry = edge_entry()
    entry.common_properties.start_time.seconds = 10**15  # past year 9999: raises

    assert not accounting.book(entry, "edge-1")
    assert metrics.telemetry_dropped.value(("edge", "unreadable")) == 1
    assert "req-7" not in accounting.booked


def test_a_request_ext_proc_did_not_answer_is_booked_by_its_fallback_route(tmp_path: Path) -> None:
    accounting = Accounting(Metrics(), tmp_path / "ledger.db", tmp_path / "audit.jsonl")
    accounting.use_policy(load_policy_file(default_policy_path()))
    entry = edge_entry()
    del entry.common_properties.metadata.filter_metadata["gpu_router"]  # no ext_proc answer
    entry.common_properties.route_name = "fallback/batch/llama-3.1-8b"

    accounting.book(entry, "edge-1")
    accounting.close()

    (row,) = sqlite3.connect(tmp_path / "ledger.db").execute(
        "select model, policy, cost_usd from requests").fetchall()
    assert row == ("llama-3.1-8b", "batch", (12 * 0.25 + 5 * 0.25) / 1e6)
    (line,) = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert json.loads(line)["reason"] == "fallback: ext_proc unavailable"
