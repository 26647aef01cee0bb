"""The edge's durable request log: every client request as one JSON line in a local file.

The gRPC access log ("gpu-router.edge") is how the control plane books requests, but Envoy
keeps nothing while that stream is down: entries flushed to a stream that then fails are gone,
and once the logger's buffer (buffer_size_bytes, 16 KiB by default) is full new entries are
dropped (access_logs.grpc_access_log.logs_dropped). So each edge also appends the same entries,
with every field booking reads, to a file the control plane reconciles against the ledger
(control_plane/ledger/reconcile.py). JSON values that are a single command operator keep their
type (numbers, objects), so a line converts back into the ALS entry it mirrors
(control_plane/telemetry/edge_file.py).

Every node shares one listener, but two Envoys must not append to one file (Envoy may split a
line over two writes): the snapshot's path holds NODE_PLACEHOLDER, which `for_node` replaces
with the node id in the listener each node is served (control_plane/xds/node.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import substitution_format_string_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from control_plane.translate.envoy_api import packed
from control_plane.translate.names import (
    EXT_PROC_FILTER,
    METADATA_NAMESPACE,
    REQUEST_METADATA_NAMESPACE,
    USAGE_METADATA_NAMESPACE,
)
from control_plane.translate.settings import EdgeSettings

FILE_LOGGER = "envoy.access_loggers.file"
NODE_PLACEHOLDER = "{node}"
FILE_SUFFIX = ".access.jsonl"
EXT_PROC_LATENCY_FIELD = "request_header_latency_us"
"""ext_proc's filter-state field booking reads: the request headers' round trip, in us."""
EXT_PROC_LATENCY = f"%FILTER_STATE({EXT_PROC_FILTER}:FIELD:{EXT_PROC_LATENCY_FIELD})%"
"""That field alone, as text: rendering ext_proc's whole filter state (as JSON here, or as the
Struct the gRPC access log's filter_state_objects_to_log packs) costs Envoy more than the rest
of an entry."""
EXT_PROC_LATENCY_TAG = "ext_proc_us"
"""Its name in both logs: this file's key, the gRPC access log's custom tag (listeners.py)."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

EDGE_FILE_FIELDS = {
    "request_id": "%STREAM_ID%",
    "log_type": "%ACCESS_LOG_TYPE%",
    "start_us": "%START_TIME(%s%6f)%",
    "status": "%RESPONSE_CODE%",
    "cluster": "%UPSTREAM_CLUSTER_RAW%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "route": "%ROUTE_NAME%",
    "first_tx_ns": "%COMMON_DURATION(DS_RX_BEG:DS_TX_BEG:ns)%",
    "last_tx_ns": "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:ns)%",
    "request_bytes": "%BYTES_RECEIVED%",
    "response_bytes": "%BYTES_SENT%",
    "decision": f"%DYNAMIC_METADATA({METADATA_NAMESPACE})%",
    "request": f"%DYNAMIC_METADATA({REQUEST_METADATA_NAMESPACE})%",
    "usage": f"%DYNAMIC_METADATA({USAGE_METADATA_NAMESPACE})%",
    EXT_PROC_LATENCY_TAG: EXT_PROC_LATENCY,
}
"""One line per client request: what booking reads from the ALS entry (client_request.py).

ext_proc's latency is read by FIELD, not as the whole filter state (:TYPED): rendering the
whole state as JSON cost Envoy 1.40 120-170 us of CPU per request on the 2-core bench machine,
more than the rest of this line together."""


def log_file(directory: str | Path, node_id: str) -> Path:
    """The file node `node_id` appends to (its id made safe for a file name)."""
    return Path(directory) / f"{_UNSAFE.sub('_', node_id)}{FILE_SUFFIX}"


def durable_edge_log(settings: EdgeSettings) -> list[accesslog_pb2.AccessLog]:
    """The file logger for the HCM's access_log list; none without settings.edge_log_dir."""
    if settings.edge_log_dir is None:
        return []
    log_format = substitution_format_string_pb2.SubstitutionFormatString()
    log_format.json_format.update(EDGE_FILE_FIELDS)
    config = file_pb2.FileAccessLog(
        path=str(Path(settings.edge_log_dir) / f"{NODE_PLACEHOLDER}{FILE_SUFFIX}"),
        log_format=log_format,
    )
    return [accesslog_pb2.AccessLog(name=FILE_LOGGER, typed_config=packed(config))]


def for_node(listener: listener_pb2.Listener, node_id: str) -> bool:
    """Point the listener's durable log (if any) at this node's own file, in place; whether it
    had one to point."""
    changed = False
    for chain in listener.filter_chains:
        for network_filter in chain.filters:
            manager = hcm_pb2.HttpConnectionManager()
            if not network_filter.typed_config.Unpack(manager):
                continue
            if _point_at_node(manager, node_id):
                network_filter.typed_config.CopyFrom(packed(manager))
                changed = True
    return changed


def _point_at_node(manager: hcm_pb2.HttpConnectionManager, node_id: str) -> bool:
    changed = False
    for access_log in manager.access_log:
        config = file_pb2.FileAccessLog()
        if access_log.name != FILE_LOGGER or not access_log.typed_config.Unpack(config):
            continue
        if NODE_PLACEHOLDER not in config.path:
            continue
        config.path = str(log_file(Path(config.path).parent, node_id))
        access_log.typed_config.CopyFrom(packed(config))
        changed = True
    return changed
