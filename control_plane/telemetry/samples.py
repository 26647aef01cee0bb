"""What an Envoy access-log entry says about a provider, as the health aggregator sees it.

Two logs reach the control plane (envoy.data.accesslog.v3.HTTPAccessLogEntry over gRPC ALS):

- "gpu-router.attempt", the router's upstream_log: one entry per failed upstream attempt, so a
  request that failed over from a provider still tells about that provider. These feed health
  (`sample_from_attempt_entry`), with the provider's Retry-After from the logged response
  header. An attempt entry has no dynamic metadata (it is the upstream request's own stream
  info, measured on Envoy 1.40), so it does not know the model: attribution.py joins it with its
  request's entry by request id. (Filter state shared with upstream is no way round: it is
  shared per upstream connection, so a reused connection logs the model of the request that
  opened it, measured.)
- "gpu-router.edge", the listener's log: one entry per client request, the client's outcome,
  with the decision ext_proc put under "gpu_router" (`decided_model`); when its last attempt
  served, that attempt's sample (`served_sample`, from the record read once from the entry:
  client_request.py).

Only entries that reached (or tried to reach) a provider cluster become samples: ext_proc's
immediate responses have no upstream cluster, and internal clusters (names starting
"gpu-router.") are not providers.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from operator import attrgetter

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from control_plane.telemetry.response_flags import UPSTREAM_FAILURE_FLAGS
from control_plane.translate.names import METADATA_NAMESPACE
from control_plane.usage.record import RequestRecord

INTERNAL_CLUSTER_PREFIX = "gpu-router."
RETRY_AFTER_HEADER = "retry-after"

# Only the final entry of a request (or of an attempt) counts; periodic and start entries
# would count it twice.
_FINAL_LOG_TYPES = frozenset(
    {accesslog_pb2.AccessLogType.NotSet, accesslog_pb2.AccessLogType.DownstreamEnd}
)
_FINAL_ATTEMPT_LOG_TYPES = frozenset(
    {accesslog_pb2.AccessLogType.NotSet, accesslog_pb2.AccessLogType.UpstreamEnd}
)

_UPSTREAM_FAILED = attrgetter(*UPSTREAM_FAILURE_FLAGS)
"""All of them read in one call."""


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
    retry_after_s: float | None = None
    """A 429's Retry-After in seconds from at_unix_ms; None when the provider sent none."""
    request_id: str = ""
    """The request's x-request-id: what joins an attempt to its request's entry."""


_TIMESTAMP_SECONDS = range(-62_135_596_800, 253_402_300_800)
"""0001-01-01 to 9999-12-31, the range protobuf's Timestamp allows."""


def unix_ms(timestamp: timestamp_pb2.Timestamp) -> int:
    """Timestamp.ToMilliseconds() with the same range check, without its pure-Python helpers
    (read several times per entry). ValueError when out of range, as there."""
    seconds, nanos = timestamp.seconds, timestamp.nanos
    if seconds not in _TIMESTAMP_SECONDS or not 0 <= nanos < 1_000_000_000:
        raise ValueError(f"timestamp out of range: {seconds} s {nanos} ns")
    return seconds * 1000 + nanos // 1_000_000


def duration_ms(duration: duration_pb2.Duration) -> float:
    return duration.seconds * 1000.0 + duration.nanos / 1_000_000.0


def _upstream_failed(flags: accesslog_pb2.ResponseFlags) -> bool:
    return any(_UPSTREAM_FAILED(flags))


def offset_ms(common: accesslog_pb2.AccessLogCommon, name: str) -> float | None:
    """One of the time_to_* offsets from start_time; None when Envoy did not reach that point."""
    return duration_ms(getattr(common, name)) if common.HasField(name) else None


def upstream_latencies(common: accesslog_pb2.AccessLogCommon) -> tuple[float, float]:
    """(ttfb_ms, total_ms) from the first byte sent upstream: ext_proc time is not the provider's.

    A request that never got a byte back (connection failure, reset before headers) has no TTFB;
    its total is the whole duration of the request (or attempt), which is what the failure cost.
    """
    first_rx = offset_ms(common, "time_to_first_upstream_rx_byte")
    if first_rx is None:
        elapsed = offset_ms(common, "duration")
        return 0.0, duration_ms(common.time_to_last_downstream_tx_byte) if elapsed is None else elapsed
    sent = offset_ms(common, "time_to_first_upstream_tx_byte") or 0.0
    last_rx = offset_ms(common, "time_to_last_upstream_rx_byte")
    return first_rx - sent, (first_rx if last_rx is None else last_rx) - sent


def decision_field(decision: struct_pb2.Struct | None, key: str) -> str:
    """A string ext_proc put in its dynamic metadata; empty when ext_proc did not decide."""
    value = None if decision is None else decision.fields.get(key)
    return "" if value is None else value.string_value


def _end_unix_ms(common: accesslog_pb2.AccessLogCommon) -> int:
    elapsed = offset_ms(common, "duration")
    if elapsed is None:
        elapsed = duration_ms(common.time_to_last_downstream_tx_byte)
    return int(unix_ms(common.start_time) + elapsed)


def is_final_request_entry(entry: accesslog_pb2.HTTPAccessLogEntry) -> bool:
    """The one entry that closes a client request (not a periodic or start entry)."""
    common = entry.common_properties
    return not common.intermediate_log_entry and common.access_log_type in _FINAL_LOG_TYPES


def served_sample(entry: accesslog_pb2.HTTPAccessLogEntry, record: RequestRecord | None,
                  node_id: str, *, at_unix_ms: int) -> RequestSample | None:
    """The health sample of the attempt that served a request, from the request's edge entry
    and the record read from it (None: the entry closes no request); None when its last attempt
    failed. The edge logs only failed attempts on the attempt log
    (translate/listeners.failed_attempts_only: a status of 400 or more, or an upstream failure
    flag), so a last attempt is a sample either from there or from here, never both."""
    if record is None or not record.provider or record.status >= 400:
        return None
    common = entry.common_properties
    if _upstream_failed(common.response_flags):
        return None
    ttfb_ms, total_ms = upstream_latencies(common)
    return RequestSample(
        provider=record.provider,
        model=record.model,
        status=record.status,
        ttfb_ms=ttfb_ms,
        total_ms=total_ms,
        at_unix_ms=at_unix_ms,
        upstream_failure=False,
        policy=record.policy,
        reason=record.reason,
        node=node_id,
        request_id=record.request_id,
    )


def parse_retry_after(value: str, now_unix_ms: int) -> float | None:
    """Seconds to wait from a Retry-After value (delay-seconds or an HTTP-date, RFC 9110 10.2.3).

    A date in the past means 0; a value that is neither form means None (no usable hint).
    """
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - now_unix_ms / 1000.0)


def sample_from_attempt_entry(
    entry: accesslog_pb2.HTTPAccessLogEntry, node_id: str, *, at_unix_ms: int | None = None
) -> RequestSample | None:
    """The sample one upstream attempt gives (router upstream_log), or None when it is not one.

    The status is the provider's own answer to this attempt (0 when it gave none: refused,
    reset, per-try timeout), not what the client finally got. The model is left empty.
    """
    common = entry.common_properties
    cluster = common.upstream_cluster
    if not cluster or cluster.startswith(INTERNAL_CLUSTER_PREFIX):
        return None
    if common.intermediate_log_entry or common.access_log_type not in _FINAL_ATTEMPT_LOG_TYPES:
        return None
    at = _end_unix_ms(common) if at_unix_ms is None else at_unix_ms
    status = entry.response.response_code.value
    retry_after = entry.response.response_headers.get(RETRY_AFTER_HEADER)
    ttfb_ms, total_ms = upstream_latencies(common)
    return RequestSample(
        provider=cluster,
        model="",
        status=status,
        ttfb_ms=ttfb_ms,
        total_ms=total_ms,
        at_unix_ms=at,
        upstream_failure=_upstream_failed(common.response_flags),
        policy="",
        reason="",
        node=node_id,
        retry_after_s=None if retry_after is None else parse_retry_after(retry_after, at),
        request_id=entry.request.request_id,
    )


def decided_model(entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
    """The public model ext_proc decided for a client request; empty when it did not decide."""
    decision = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
    return decision_field(decision, "model")
