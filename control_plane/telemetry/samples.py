"""One finished request as the health aggregator sees it, read from an Envoy access-log entry.

Envoy's gRPC access log (envoy.data.accesslog.v3.HTTPAccessLogEntry) carries the upstream
cluster, the upstream timings, the response flags and the dynamic metadata ext_proc set
under "gpu_router". Only entries that reached (or tried to reach) a provider cluster become
samples: ext_proc's immediate responses have no upstream cluster, and internal clusters
(names starting "gpu-router.") are not providers.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import duration_pb2, struct_pb2

METADATA_NAMESPACE = "gpu_router"
INTERNAL_CLUSTER_PREFIX = "gpu-router."

# Only the final entry of a request counts; periodic and start entries would count it twice.
_FINAL_LOG_TYPES = frozenset(
    {accesslog_pb2.AccessLogType.NotSet, accesslog_pb2.AccessLogType.DownstreamEnd}
)

# Response flags that blame the provider (or the path to it), not the client or the router.
_UPSTREAM_FAILURE_FLAGS = (
    "upstream_connection_failure",
    "upstream_remote_reset",
    "upstream_connection_termination",
    "upstream_overflow",
    "upstream_request_timeout",
    "upstream_retry_limit_exceeded",
    "upstream_protocol_error",
    "upstream_max_stream_duration_reached",
    "no_healthy_upstream",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestSample:
    """What one request says about one provider."""

    provider: str
    """The provider cluster Envoy sent the (last attempt of the) request to."""
    model: str
    """Public model name from ext_proc's metadata; empty when ext_proc did not decide."""
    status: int
    """HTTP status sent to the client; 0 when Envoy never produced one."""
    ttfb_ms: float
    """From the first byte sent upstream to the first byte back; 0 when nothing came back."""
    total_ms: float
    """From the first byte sent upstream to the last byte back (the provider's own latency)."""
    at_unix_ms: int
    """When the request finished; windows and cooldowns are judged on this."""
    upstream_failure: bool
    """Envoy flagged a connection failure, reset, overflow or timeout on the way to the provider."""
    policy: str
    reason: str
    node: str
    """Envoy node id that logged it."""


def _ms(duration: duration_pb2.Duration) -> float:
    return duration.seconds * 1000.0 + duration.nanos / 1_000_000.0


def _upstream_failed(flags: accesslog_pb2.ResponseFlags) -> bool:
    return any(getattr(flags, name) for name in _UPSTREAM_FAILURE_FLAGS)


def _offset_ms(common: accesslog_pb2.AccessLogCommon, name: str) -> float | None:
    """One of the time_to_* offsets from start_time; None when Envoy did not reach that point."""
    return _ms(getattr(common, name)) if common.HasField(name) else None


def _latencies(common: accesslog_pb2.AccessLogCommon) -> tuple[float, float]:
    """(ttfb_ms, total_ms) from the first byte sent upstream: ext_proc time is not the provider's.

    A request that never got a byte back (connection failure, reset before headers) has no TTFB;
    its total is the whole downstream duration, which is what the failure cost the client.
    """
    first_rx = _offset_ms(common, "time_to_first_upstream_rx_byte")
    if first_rx is None:
        return 0.0, _ms(common.time_to_last_downstream_tx_byte)
    sent = _offset_ms(common, "time_to_first_upstream_tx_byte") or 0.0
    last_rx = _offset_ms(common, "time_to_last_upstream_rx_byte")
    return first_rx - sent, (first_rx if last_rx is None else last_rx) - sent


def _decision_field(decision: struct_pb2.Struct | None, key: str) -> str:
    """A string ext_proc put in its dynamic metadata; empty when ext_proc did not decide."""
    if decision is None or key not in decision.fields:
        return ""
    return decision.fields[key].string_value


def _end_unix_ms(common: accesslog_pb2.AccessLogCommon) -> int:
    elapsed = _offset_ms(common, "duration")
    if elapsed is None:
        elapsed = _ms(common.time_to_last_downstream_tx_byte)
    return int(common.start_time.ToMilliseconds() + elapsed)


def sample_from_log_entry(
    entry: accesslog_pb2.HTTPAccessLogEntry, node_id: str, *, at_unix_ms: int | None = None
) -> RequestSample | None:
    """The sample an access-log entry gives, or None when it says nothing about a provider.

    `at_unix_ms` overrides the entry's own end time: a receiver stamps samples with its own
    clock so that windows are not skewed by the clocks of many Envoy hosts.
    """
    common = entry.common_properties
    cluster = common.upstream_cluster
    if not cluster or cluster.startswith(INTERNAL_CLUSTER_PREFIX):
        return None
    if common.intermediate_log_entry or common.access_log_type not in _FINAL_LOG_TYPES:
        return None
    decision = common.metadata.filter_metadata.get(METADATA_NAMESPACE)
    ttfb_ms, total_ms = _latencies(common)
    return RequestSample(
        provider=cluster,
        model=_decision_field(decision, "model"),
        status=entry.response.response_code.value,
        ttfb_ms=ttfb_ms,
        total_ms=total_ms,
        at_unix_ms=_end_unix_ms(common) if at_unix_ms is None else at_unix_ms,
        upstream_failure=_upstream_failed(common.response_flags),
        policy=_decision_field(decision, "policy"),
        reason=_decision_field(decision, "reason"),
        node=node_id,
    )
