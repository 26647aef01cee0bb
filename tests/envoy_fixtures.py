"""Pieces of static Envoy bootstraps that component tests build for the real Envoy."""

from __future__ import annotations

from typing import Any

TYPE_PREFIX = "type.googleapis.com/"


def static_cluster(
    name: str, port: int, *, http2: bool = False, connect_timeout: str = "1s",
    buffer_limit: int | None = None,
) -> dict[str, Any]:
    """A STATIC cluster of one 127.0.0.1 endpoint; HTTP/2 for gRPC services."""
    endpoint = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                            "port_value": port}}}}
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
    }
    if buffer_limit is not None:
        cluster["per_connection_buffer_limit_bytes"] = buffer_limit
    if http2:
        options = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        cluster["typed_extension_protocol_options"] = {
            options: {"@type": TYPE_PREFIX + options,
                      "explicit_http_config": {"http2_protocol_options": {}}},
        }
    return cluster
