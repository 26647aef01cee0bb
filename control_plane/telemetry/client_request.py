"""A client request's edge-log entry, read once for every reader.

The access-log receiver takes from each client-request entry the served attempt's health sample,
and the ledger books the same entry; both used to read its fields and check its times and sizes
on their own. The receiver now reads the entry into a RequestRecord and checks the half of its
validation that names nothing (validation.shape_problem) once, and hands both on in a
ClientRequest; each reader still checks the names against its own view of the policy (the
receiver the current policy, the ledger the recent ones: validation.py). The reconciler, which
reads the edges' durable logs, builds the same ClientRequest from a line's entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2

from control_plane.telemetry.samples import (
    INTERNAL_CLUSTER_PREFIX,
    decision_field,
    duration_ms,
    is_final_request_entry,
    offset_ms,
    unix_ms,
)
from control_plane.telemetry.validation import Limits, shape_problem
from control_plane.translate.durable_log import EXT_PROC_LATENCY_TAG
from control_plane.translate.names import (
    METADATA_NAMESPACE,
    REQUEST_METADATA_NAMESPACE,
    USAGE_METADATA_NAMESPACE,
)
from control_plane.usage.record import RequestRecord

_MAX_EXT_PROC_US = 3_600_000_000
"""An hour: a latency beyond it (or not a number) is a broken value, not a time to observe."""


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """One client-request entry as it arrived, with what reading it once gave."""

    entry: accesslog_pb2.HTTPAccessLogEntry
    node: str
    """The Envoy node that sent (or wrote) it."""
    record: RequestRecord | None
    """None when the entry closes no request (a periodic or start entry)."""
    shape: str | None
    """validation.shape_problem of the entry; None when its times and sizes are believable."""


def read_client_request(entry: accesslog_pb2.HTTPAccessLogEntry, node: str, now_ms: int,
                        limits: Limits) -> ClientRequest:
    """The entry read, its times and sizes checked against `now_ms`. Raises (ValueError,
    TypeError, ...) on a field it cannot read: the caller counts the entry as unreadable."""
    return ClientRequest(entry=entry, node=node, record=record_from_edge_entry(entry),
                         shape=shape_problem(entry, now_ms, limits))


def _struct(common: accesslog_pb2.AccessLogCommon, namespace: str) -> struct_pb2.Struct | None:
    return common.metadata.filter_metadata.get(namespace)


def ext_proc_latency_us(common: accesslog_pb2.AccessLogCommon) -> int:
    """The latency tag as Envoy rendered it ("-" when ext_proc was not called); 0 for none."""
    try:
        us = float(common.custom_tags.get(EXT_PROC_LATENCY_TAG, ""))
    except ValueError:
        return 0
    return int(us) if 0 <= us < _MAX_EXT_PROC_US else 0  # NaN, inf, negative: no latency


def record_from_edge_entry(entry: accesslog_pb2.HTTPAccessLogEntry) -> RequestRecord | None:
    """The client request an edge log entry closes; None for a periodic or start entry."""
    if not is_final_request_entry(entry):
        return None
    common = entry.common_properties
    decision = _struct(common, METADATA_NAMESPACE)
    body = _struct(common, REQUEST_METADATA_NAMESPACE)
    usage = _struct(common, USAGE_METADATA_NAMESPACE)
    cluster = common.upstream_cluster
    provider = "" if not cluster or cluster.startswith(INTERNAL_CLUSTER_PREFIX) else cluster
    fallbacks = decision_field(decision, "fallbacks")
    first_byte = offset_ms(common, "time_to_first_downstream_tx_byte")
    return RequestRecord(
        request_id=entry.request.request_id,
        at_unix_ms=unix_ms(common.start_time),
        model=decision_field(decision, "model"),
        policy=decision_field(decision, "policy"),
        strategy=decision_field(decision, "strategy"),
        reason=decision_field(decision, "reason"),
        fallbacks=tuple(fallbacks.split(",")) if fallbacks else (),
        candidates=decision_field(decision, "candidates"),
        provider=provider,
        attempts=common.upstream_request_attempt_count,
        status=entry.response.response_code.value,
        ttfb_ms=first_byte or 0.0,
        total_ms=duration_ms(common.time_to_last_downstream_tx_byte),
        stream=body is not None and "stream" in body.fields and body.fields["stream"].bool_value,
        request_bytes=entry.request.request_body_bytes,
        response_bytes=entry.response.response_body_bytes,
        usage_text=decision_field(usage, "text"),
        ext_proc_us=ext_proc_latency_us(common),
        route=common.route_name,
        client=decision_field(decision, "client"),
        client_request_id=decision_field(body, "client_request_id"),
        path=decision_field(decision, "path").partition("?")[0],
        max_tokens=_max_tokens(body),
    )


def _max_tokens(body: struct_pb2.Struct | None) -> int:
    """The body's max_completion_tokens, else max_tokens, as ext_proc reads them; -1: none."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = None if body is None else body.fields.get(key)
        if value is not None:
            number = value.number_value if value.WhichOneof("kind") == "number_value" else -1.0
            return int(number) if 0 <= number < float("inf") else -1
    return -1
