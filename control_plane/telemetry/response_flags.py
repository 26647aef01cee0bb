"""Envoy's response flags as the access log carries them (ResponseFlags' boolean fields), and
which of them blame a provider: named once here for the samples, the attempt log's filter and
`why`. No imports of our own, so translation and telemetry can both read it."""

from __future__ import annotations

UPSTREAM_FAILURE_FLAGS = (
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
"""Response flags that blame the provider (or the path to it), not the client or the router
(translate/listeners.py FAILED_ATTEMPT_FLAGS are their short names, from FLAG_NAMES)."""

FLAG_NAMES = {
    "failed_local_healthcheck": "LH", "no_healthy_upstream": "UH",
    "upstream_request_timeout": "UT", "local_reset": "LR", "upstream_remote_reset": "UR",
    "upstream_connection_failure": "UF", "upstream_connection_termination": "UC",
    "upstream_overflow": "UO", "no_route_found": "NR", "delay_injected": "DI",
    "fault_injected": "FI", "rate_limited": "RL", "rate_limit_service_error": "RLSE",
    "downstream_connection_termination": "DC", "upstream_retry_limit_exceeded": "URX",
    "stream_idle_timeout": "SI", "invalid_envoy_request_headers": "IH",
    "downstream_protocol_error": "DPE", "upstream_max_stream_duration_reached": "UMSDR",
    "response_from_cache_filter": "RFCF", "no_filter_config_found": "NFCF",
    "duration_timeout": "DT", "upstream_protocol_error": "UPE", "no_cluster_found": "NC",
    "overload_manager": "OM", "dns_resolution_failure": "DF", "downstream_remote_reset": "DR",
}
"""ResponseFlags' boolean fields by Envoy's short names (%RESPONSE_FLAGS%), the names its docs
and logs use; `unauthorized_details` (a message, UAEX) never applies to an upstream attempt."""
