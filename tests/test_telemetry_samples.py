"""served_sample and sample_from_attempt_entry on hand-built access-log entries."""

from __future__ import annotations

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from control_plane.telemetry.client_request import record_from_edge_entry
from control_plane.telemetry.samples import (
    RequestSample,
    decided_model,
    parse_retry_after,
    sample_from_attempt_entry,
    served_sample,
    unix_ms,
)

START_MS = 1_700_000_000_123


def _duration(ms: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(ms // 1000), nanos=round((ms % 1000) * 1_000_000))


def log_entry(
    cluster: str = "prov-a",
    status: int | None = 200,
    *,
    tx_ms: float | None = 2.0,
    first_rx_ms: float | None = 12.0,
    last_rx_ms: float | None = 52.0,
    duration_ms: float = 53.0,
    metadata: dict[str, str] | None = None,
    flags: tuple[str, ...] = (),
    log_type: int = accesslog_pb2.AccessLogType.DownstreamEnd,
) -> accesslog_pb2.HTTPAccessLogEntry:
    """An entry as Envoy's http_grpc logger builds it (timings relative to start_time)."""
    entry = accesslog_pb2.HTTPAccessLogEntry()
    common = entry.common_properties
    common.upstream_cluster = cluster
    common.start_time.FromMilliseconds(START_MS)
    common.access_log_type = log_type
    if tx_ms is not None:
        common.time_to_first_upstream_tx_byte.CopyFrom(_duration(tx_ms))
    if first_rx_ms is not None:
        common.time_to_first_upstream_rx_byte.CopyFrom(_duration(first_rx_ms))
    if last_rx_ms is not None:
        common.time_to_last_upstream_rx_byte.CopyFrom(_duration(last_rx_ms))
    common.time_to_last_downstream_tx_byte.CopyFrom(_duration(duration_ms))
    common.duration.CopyFrom(_duration(duration_ms))
    for flag in flags:
        setattr(common.response_flags, flag, True)
    if metadata is not None:
        decision = struct_pb2.Struct()
        decision.update(metadata)
        common.metadata.filter_metadata["gpu_router"].CopyFrom(decision)
    if status is not None:
        entry.response.response_code.value = status
    return entry


def served(entry: accesslog_pb2.HTTPAccessLogEntry,
           at_unix_ms: int = START_MS + 53) -> RequestSample | None:
    """The served sample the receiver takes from a client-request entry it read."""
    record = record_from_edge_entry(entry)
    return served_sample(entry, record, "edge-1", at_unix_ms=at_unix_ms)


def test_successful_entry_gives_provider_latency_and_decision() -> None:
    entry = log_entry(
        metadata={
            "provider": "prov-a",
            "model": "m1",
            "policy": "chat",
            "strategy": "latency",
            "reason": "fastest",
            "fallbacks": "b,c",
        }
    )
    assert served(entry) == RequestSample(
        provider="prov-a",
        model="m1",
        status=200,
        ttfb_ms=10.0,
        total_ms=50.0,
        at_unix_ms=START_MS + 53,
        upstream_failure=False,
        policy="chat",
        reason="fastest",
        node="edge-1",
    )


def test_the_receivers_clock_stamps_the_sample() -> None:
    sample = served(log_entry(), at_unix_ms=42)
    assert sample is not None and sample.at_unix_ms == 42


def test_entry_without_decision_metadata_still_counts_for_the_provider() -> None:
    sample = served(log_entry(metadata=None))
    assert sample is not None
    assert (sample.provider, sample.model, sample.policy, sample.reason) == ("prov-a", "", "", "")


@pytest.mark.parametrize(
    "flag",
    [
        "upstream_connection_failure",
        "upstream_remote_reset",
        "upstream_overflow",
        "upstream_request_timeout",
        "no_healthy_upstream",
    ],
)
def test_a_last_attempt_with_an_upstream_failure_flag_is_no_served_sample(flag: str) -> None:
    # (it is on the attempt log, failed_attempts_only: a sample from there, not twice)
    assert served(log_entry(flags=(flag,))) is None


@pytest.mark.parametrize("status", [400, 429, 503])
def test_a_last_attempt_that_failed_is_no_served_sample(status: int) -> None:
    assert served(log_entry(status=status)) is None


def test_client_side_flags_are_not_upstream_failures() -> None:
    assert served(log_entry(flags=("downstream_connection_termination",))) is not None


def test_headers_only_response_uses_first_byte_as_last() -> None:
    sample = served(log_entry(last_rx_ms=None))
    assert sample is not None and sample.total_ms == sample.ttfb_ms == 10.0


def test_missing_response_code_is_zero() -> None:
    sample = served(log_entry(status=None))
    assert sample is not None and sample.status == 0


@pytest.mark.parametrize("cluster", ["", "gpu-router.ext_proc", "gpu-router.xds"])
def test_entries_not_about_a_provider_are_skipped(cluster: str) -> None:
    assert served(log_entry(cluster=cluster)) is None


@pytest.mark.parametrize(
    "log_type",
    [
        accesslog_pb2.AccessLogType.DownstreamPeriodic,
        accesslog_pb2.AccessLogType.UpstreamEnd,
        accesslog_pb2.AccessLogType.DownstreamStart,
    ],
)
def test_non_final_entries_are_skipped(log_type: int) -> None:
    assert served(log_entry(log_type=log_type)) is None


def test_intermediate_entries_are_skipped() -> None:
    entry = log_entry()
    entry.common_properties.intermediate_log_entry = True
    assert served(entry) is None


def test_unset_log_type_counts() -> None:
    assert served(log_entry(log_type=accesslog_pb2.AccessLogType.NotSet)) is not None


def attempt_entry(
    cluster: str = "prov-a",
    status: int | None = 200,
    *,
    retry_after: str | None = None,
    first_rx_ms: float | None = 12.0,
    last_rx_ms: float | None = 52.0,
    duration_ms: float = 53.0,
) -> accesslog_pb2.HTTPAccessLogEntry:
    """An entry as the router's upstream_log builds it: no downstream timings, no metadata."""
    entry = log_entry(
        cluster,
        status,
        first_rx_ms=first_rx_ms,
        last_rx_ms=last_rx_ms,
        duration_ms=duration_ms,
        log_type=accesslog_pb2.AccessLogType.UpstreamEnd,
    )
    entry.common_properties.ClearField("time_to_last_downstream_tx_byte")
    entry.request.request_id = "req-1"
    if retry_after is not None:
        entry.response.response_headers["retry-after"] = retry_after
    return entry


def test_attempt_entry_gives_provider_latency_and_request_id() -> None:
    assert sample_from_attempt_entry(attempt_entry(), "edge-1") == RequestSample(
        provider="prov-a",
        model="",
        status=200,
        ttfb_ms=10.0,
        total_ms=50.0,
        at_unix_ms=START_MS + 53,
        upstream_failure=False,
        policy="",
        reason="",
        node="edge-1",
        retry_after_s=None,
        request_id="req-1",
    )


def test_attempt_429_carries_retry_after() -> None:
    sample = sample_from_attempt_entry(
        attempt_entry(status=429, retry_after="7"), "e", at_unix_ms=5
    )
    assert sample is not None and (sample.status, sample.retry_after_s) == (429, 7.0)


def test_decided_model_of_a_request_entry() -> None:
    assert decided_model(log_entry(metadata={"model": "m1", "provider": "prov-a"})) == "m1"
    assert decided_model(log_entry(metadata=None)) == ""


def test_failed_attempt_lasts_its_own_duration() -> None:
    entry = attempt_entry(status=0, first_rx_ms=None, last_rx_ms=None, duration_ms=500.0)
    entry.common_properties.response_flags.upstream_request_timeout = True
    sample = sample_from_attempt_entry(entry, "edge-1")
    assert sample is not None and sample.upstream_failure and sample.status == 0
    assert (sample.ttfb_ms, sample.total_ms) == (0.0, 500.0)


@pytest.mark.parametrize("cluster", ["", "gpu-router.ext_proc"])
def test_attempts_not_to_a_provider_are_skipped(cluster: str) -> None:
    assert sample_from_attempt_entry(attempt_entry(cluster=cluster), "edge-1") is None


def test_request_entries_are_not_attempts() -> None:
    assert sample_from_attempt_entry(log_entry(), "edge-1") is None


NOW_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2", 2.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("Tue, 14 Nov 2023 22:13:30 GMT", 10.0),
        ("Tue, 14 Nov 2023 22:13:00 GMT", 0.0),  # in the past: go ahead now
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("", None),
    ],
)
def test_parse_retry_after(value: str, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW_MS) == seconds


@pytest.mark.parametrize(("seconds", "nanos"), [
    (0, 0), (-1, 999_999_999), (-62135596800, 0), (253402300799, 999_999_999),
    (1764590000, 123_456_789), (-62135596801, 0), (253402300800, 0), (0, -1), (0, 1_000_000_000),
])
def test_unix_ms_is_protobufs_to_milliseconds(seconds: int, nanos: int) -> None:
    """The same value, and the same ValueError out of Timestamp's range, at its ends."""
    timestamp = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    try:
        expected: int | type[ValueError] = timestamp.ToMilliseconds()
    except ValueError:
        expected = ValueError
    if expected is ValueError:
        with pytest.raises(ValueError, match="out of range"):
            unix_ms(timestamp)
    else:
        assert unix_ms(timestamp) == expected
