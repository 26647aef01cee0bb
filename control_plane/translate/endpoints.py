"""Provider endpoints: EDS ClusterLoadAssignments, and the inline assignment of DNS clusters.

A provider whose host is an IP literal (or "localhost") is served over EDS, so the control plane
can change its endpoints without re-warming the cluster; a DNS name is left to Envoy's resolver.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

from control_plane.policy.model import Provider, RoutingConfig
from control_plane.translate.envoy_api import provider_metadata

LOOPBACK = "127.0.0.1"


def ip_address(host: str) -> str | None:
    """The IP a host names without DNS ("localhost" is loopback), or None for a DNS name."""
    if host == "localhost":
        return LOOPBACK
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def uses_eds(provider: Provider) -> bool:
    return ip_address(provider.upstream.host) is not None


def load_assignment(provider: Provider) -> endpoint_pb2.ClusterLoadAssignment:
    """The provider's one endpoint (an IP, or the DNS name for STRICT_DNS), tagged with its name."""
    upstream = provider.upstream
    return single_endpoint(
        provider.name,
        ip_address(upstream.host) or upstream.host,
        upstream.port,
        hostname=upstream.host,
        metadata=provider_metadata(provider.name),
    )


def lb_endpoint(
    address: str, port: int, *, hostname: str = "", metadata: base_pb2.Metadata | None = None
) -> endpoint_components_pb2.LbEndpoint:
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(address=address, port_value=port)
            ),
            hostname=hostname,
        ),
        metadata=metadata,
    )


def assignment(
    cluster: str, endpoints: Sequence[endpoint_components_pb2.LbEndpoint]
) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster,
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=endpoints)],
    )


def single_endpoint(
    cluster: str,
    address: str,
    port: int,
    *,
    hostname: str = "",
    metadata: base_pb2.Metadata | None = None,
) -> endpoint_pb2.ClusterLoadAssignment:
    return assignment(cluster, [lb_endpoint(address, port, hostname=hostname, metadata=metadata)])


def endpoint_assignments(config: RoutingConfig) -> dict[str, endpoint_pb2.ClusterLoadAssignment]:
    """EDS resources, by cluster name, for the providers served over EDS."""
    return {p.name: load_assignment(p) for p in config.providers if uses_eds(p)}
