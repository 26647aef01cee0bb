"""The edge route table: ext_proc's pick first, a weighted spread over providers as the fallback.

Route 1 matches only when ext_proc has set the cluster header to a provider (client copies are
stripped before routing, see listeners.py). Route 2 is reached only when ext_proc did not answer
(failure_mode_allow): it spreads over the providers with weights the control plane may drive.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc_pb2
from envoy.config.route.v3 import route_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import wrappers_pb2

from control_plane.policy.model import RoutingConfig
from control_plane.translate.envoy_api import seconds
from control_plane.translate.errors import TranslationError
from control_plane.translate.names import (
    CLUSTER_HEADER,
    METADATA_NAMESPACE,
    PROVIDER_RESPONSE_HEADER,
    REASON_RESPONSE_HEADER,
    ROUTE_CONFIG,
)
from control_plane.translate.settings import EdgeSettings

FALLBACK_REASON = "fallback: ext_proc unavailable"


def route_configuration(
    config: RoutingConfig, settings: EdgeSettings, weights: Mapping[str, int] | None = None
) -> route_pb2.RouteConfiguration:
    """`weights` (provider -> weight, 0 drains it) shapes the fallback route; None means equal."""
    timeout = seconds(settings.upstream_timeout_s)
    # The upstream Lua filter buffers the body to rewrite the model: a 1 MiB+ prompt must not 413.
    body_limit = wrappers_pb2.UInt64Value(value=settings.buffer_limit_bytes)
    picked = rc_pb2.Route(
        name="ext_proc-pick",
        match=rc_pb2.RouteMatch(prefix="/", headers=[_names_a_provider(config)]),
        route=rc_pb2.RouteAction(
            cluster_header=CLUSTER_HEADER,
            timeout=timeout,
            auto_host_rewrite=wrappers_pb2.BoolValue(value=True),
        ),
        response_headers_to_add=[
            _response_header(PROVIDER_RESPONSE_HEADER, "%UPSTREAM_CLUSTER%"),
            _response_header(
                REASON_RESPONSE_HEADER, f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:reason)%"
            ),
        ],
        # Applied after the cluster is chosen: the provider never sees our routing header.
        request_headers_to_remove=[CLUSTER_HEADER],
        request_body_buffer_limit=body_limit,
    )
    fallback = rc_pb2.Route(
        name="fallback",
        match=rc_pb2.RouteMatch(prefix="/"),
        route=rc_pb2.RouteAction(
            weighted_clusters=_weighted_clusters(config, weights),
            timeout=timeout,
            auto_host_rewrite=wrappers_pb2.BoolValue(value=True),
        ),
        response_headers_to_add=[
            _response_header(PROVIDER_RESPONSE_HEADER, "%UPSTREAM_CLUSTER%"),
            _response_header(REASON_RESPONSE_HEADER, FALLBACK_REASON),
        ],
        request_body_buffer_limit=body_limit,
    )
    return route_pb2.RouteConfiguration(
        name=ROUTE_CONFIG,
        virtual_hosts=[
            rc_pb2.VirtualHost(name="gpu-router", domains=["*"], routes=[picked, fallback])
        ],
    )


def _names_a_provider(config: RoutingConfig) -> rc_pb2.HeaderMatcher:
    """The cluster header holds one of the providers: whatever else it holds, even by mistake,
    can never reach an internal cluster (gpu-router.*) through this route."""
    alternatives = "|".join(re.escape(p.name) for p in config.providers)
    return rc_pb2.HeaderMatcher(
        name=CLUSTER_HEADER,
        string_match=string_pb2.StringMatcher(
            safe_regex=regex_pb2.RegexMatcher(regex=f"^(?:{alternatives})$")
        ),
    )


def _weighted_clusters(
    config: RoutingConfig, weights: Mapping[str, int] | None
) -> rc_pb2.WeightedCluster:
    names = [p.name for p in config.providers]
    if weights is None:
        weights = dict.fromkeys(names, 1)
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise TranslationError(f"fallback weights name unknown providers: {', '.join(unknown)}")
    if any(w < 0 for w in weights.values()):
        raise TranslationError(f"fallback weights must not be negative: {dict(weights)}")
    clusters = [
        rc_pb2.WeightedCluster.ClusterWeight(
            name=name, weight=wrappers_pb2.UInt32Value(value=weights[name])
        )
        for name in names
        if weights.get(name, 0) > 0
    ]
    if not clusters:
        raise TranslationError(
            "the fallback route needs at least one provider with a positive weight"
        )
    return rc_pb2.WeightedCluster(clusters=clusters)


def _response_header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
