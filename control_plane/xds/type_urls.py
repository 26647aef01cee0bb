"""The xDS resource types this control plane serves, and the order they go out in.

The order is written down once, here: the xDS protocol's eventual-consistency rules
want clusters before their endpoints and listeners before their route configurations
(an updated cluster warms until its endpoints arrive; a listener names its route
configuration). Secrets follow clusters and precede listeners, which may reference
them. Our own resources go last: they are read by ext_proc replicas, never by Envoy; the CRL
first of them, so a replica refuses revoked edges before it holds a policy to serve.
"""

from __future__ import annotations

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
ROUTING_POLICY = "type.googleapis.com/gpu_router.api.v1.RoutingPolicy"
HEALTH_SNAPSHOT = "type.googleapis.com/gpu_router.api.v1.HealthSnapshot"
CLIENT_SPEND = "type.googleapis.com/gpu_router.api.v1.ClientSpendSnapshot"
REVOCATION_LIST = "type.googleapis.com/gpu_router.api.v1.RevocationList"

SEND_ORDER: tuple[str, ...] = (
    CLUSTER,
    ENDPOINT,
    SECRET,
    LISTENER,
    ROUTE,
    REVOCATION_LIST,
    ROUTING_POLICY,
    HEALTH_SNAPSHOT,
    CLIENT_SPEND,
)
"""Order matters: when several types change at once, responses go out in this order."""

WILDCARD_TYPES: frozenset[str] = frozenset(
    {LISTENER, CLUSTER, REVOCATION_LIST, ROUTING_POLICY, HEALTH_SNAPSHOT, CLIENT_SPEND}
)
"""Types where an empty subscription means "everything" (state of the world: the full set)."""

RESENT_AFTER: dict[str, str] = {ENDPOINT: CLUSTER}
"""Type -> type whose response forces a re-send of it: an updated cluster warms until it
receives its ClusterLoadAssignment again, even when the endpoints did not change."""


def send_rank(type_url: str) -> int:
    """Position in SEND_ORDER; unknown types sort last."""
    try:
        return SEND_ORDER.index(type_url)
    except ValueError:
        return len(SEND_ORDER)
