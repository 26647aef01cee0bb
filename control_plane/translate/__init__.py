"""RoutingConfig -> Envoy resources (LDS/RDS/CDS/EDS/SDS), as pure functions.

Same config, settings and credentials give byte-identical protos (serialize with
deterministic=True), so xDS versions can be content hashes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from control_plane.edge_certificate import ListenerCertificate
from control_plane.policy.model import RoutingConfig
from control_plane.translate.clusters import all_clusters
from control_plane.translate.endpoints import endpoint_assignments
from control_plane.translate.errors import MissingCredentialError, TranslationError
from control_plane.translate.listeners import all_listeners, ext_proc_headers
from control_plane.translate.names import EDGE_LISTENER_SECRET, ROUTE_CONFIG
from control_plane.translate.routes import route_configuration
from control_plane.translate.secrets import credential_secrets, listener_secret
from control_plane.translate.settings import EdgeSettings

__all__ = [
    "EdgeSettings",
    "EnvoyResources",
    "MissingCredentialError",
    "TranslationError",
    "check_translatable",
    "translate",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvoyResources:
    """One consistent set of Envoy resources, each by resource name (read-only mappings)."""

    listeners: Mapping[str, listener_pb2.Listener]
    routes: Mapping[str, route_pb2.RouteConfiguration]
    clusters: Mapping[str, cluster_pb2.Cluster]
    endpoints: Mapping[str, endpoint_pb2.ClusterLoadAssignment]
    secrets: Mapping[str, secret_pb2.Secret]


def translate(
    config: RoutingConfig,
    settings: EdgeSettings,
    credentials: Mapping[str, str],
    listener_certificate: ListenerCertificate | None = None,
) -> EnvoyResources:
    """Every resource the edge needs for `config`, before fleet health shapes the routes and
    clusters (the rollout does that: rollout.py).

    `credentials` maps provider name -> resolved key for providers whose policy has a credential
    (MissingCredentialError if one is absent); `listener_certificate` is what the edge listener
    serves, given exactly when settings.edge_tls (TranslationError otherwise: a certificate
    the listener would not serve is a mistake to name, not to drop).
    """
    secrets = credential_secrets(config, credentials)
    if settings.edge_tls != (listener_certificate is not None):
        raise TranslationError(
            "the edge serves TLS but no listener certificate was given" if settings.edge_tls
            else "a listener certificate was given but the edge serves plain HTTP")
    if listener_certificate is not None:
        secrets[EDGE_LISTENER_SECRET] = listener_secret(listener_certificate)
    return EnvoyResources(
        # Clients declared: only ext_proc checks keys, so the edge must not go on without it.
        listeners=MappingProxyType(all_listeners(
            replace(settings, ext_proc_fail_open=False) if config.clients else settings,
            ext_proc_headers(config))),
        routes=MappingProxyType({ROUTE_CONFIG: route_configuration(config, settings)}),
        clusters=MappingProxyType(all_clusters(config, settings)),
        endpoints=MappingProxyType(endpoint_assignments(config)),
        secrets=MappingProxyType(secrets),
    )


def check_translatable(config: RoutingConfig, settings: EdgeSettings | None = None) -> None:
    """Raise the TranslationError translate() would raise for `config` itself (the route limit,
    fallback weights, clusters), without needing its credentials: what `gpu-router validate`
    checks, so it refuses what `gpu-router up` would."""
    settings = settings or EdgeSettings()
    route_configuration(config, settings)
    all_clusters(config, settings)
    endpoint_assignments(config)
