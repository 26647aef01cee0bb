"""A line of the edge's durable request log, back into the ALS entry it mirrors.

Each line (translate/durable_log.py EDGE_FILE_FIELDS) carries what booking reads from an
HTTPAccessLogEntry; rebuilding that entry lets the reconciler book through the very code the
gRPC access log goes through (telemetry/client_request.py reads it, accounting.py books it),
so both paths give the same record.
"""

from __future__ import annotations

import json
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2

from control_plane.translate.durable_log import EXT_PROC_LATENCY_FIELD, EXT_PROC_LATENCY_TAG
from control_plane.translate.names import (
    METADATA_NAMESPACE,
    REQUEST_METADATA_NAMESPACE,
    USAGE_METADATA_NAMESPACE,
)

_NAMESPACES = {
    "decision": METADATA_NAMESPACE,
    "request": REQUEST_METADATA_NAMESPACE,
    "usage": USAGE_METADATA_NAMESPACE,
}


class EdgeLineError(ValueError):
    """A line that is not a complete edge entry (truncated, or from another format)."""


def entry_from_line(line: bytes | str) -> accesslog_pb2.HTTPAccessLogEntry:
    """The ALS entry one JSON line stands for; EdgeLineError when it cannot be read."""
    try:
        fields = json.loads(line)
        return _entry(fields)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise EdgeLineError(f"unreadable edge log line {_preview(line)!r}: {error}") from error


def _entry(fields: dict[str, Any]) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    common = entry.common_properties
    common.access_log_type = accesslog_pb2.AccessLogType.Value(fields["log_type"])
    start_us = int(fields["start_us"])
    common.start_time.FromMicroseconds(start_us)
    common.upstream_cluster = fields.get("cluster") or ""
    common.upstream_request_attempt_count = int(fields.get("attempts") or 0)
    common.route_name = fields.get("route") or ""
    for name, key in (("time_to_first_downstream_tx_byte", "first_tx_ns"),
                      ("time_to_last_downstream_tx_byte", "last_tx_ns")):
        nanos = fields.get(key)
        if nanos is not None:
            getattr(common, name).FromNanoseconds(int(nanos))
    for key, namespace in _NAMESPACES.items():
        if fields.get(key):
            common.metadata.filter_metadata[namespace].update(fields[key])
    latency = _ext_proc_latency(fields)
    if latency is not None:
        common.custom_tags[EXT_PROC_LATENCY_TAG] = latency
    entry.request.request_id = fields["request_id"]
    entry.request.request_body_bytes = int(fields.get("request_bytes") or 0)
    status = int(fields.get("status") or 0)
    if status:
        entry.response.response_code.value = status
    entry.response.response_body_bytes = int(fields.get("response_bytes") or 0)
    return entry


def _ext_proc_latency(fields: dict[str, Any]) -> str | None:
    """ext_proc's latency as the gRPC access log's tag carries it: the text Envoy rendered
    (EXT_PROC_LATENCY_TAG), or the field of the whole state lines an edge wrote before carry
    (":TYPED", "ext_proc"); None when there is none. A latency that is not a number costs only
    the latency metric, never the line's booking (client_request.ext_proc_latency_us drops it, and
    one out of range, NaN and infinities included, from either log)."""
    latency = fields.get(EXT_PROC_LATENCY_TAG)
    if latency is None and isinstance(fields.get("ext_proc"), dict):
        latency = fields["ext_proc"].get(EXT_PROC_LATENCY_FIELD)
    return None if latency is None else str(latency)


def _preview(line: bytes | str, limit: int = 80) -> str:
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    return text[:limit]
