"""The edge route table: a few routes per policy that walk the order ext_proc picks for each
request, then the fallback routes (fallback_routes.py) for requests ext_proc did not answer.

ext_proc ranks the providers able to serve a request (the winner, then at most the policy's
max_fallbacks fallbacks). It names the policy, the model and the order's length in a request
header, "<policy>/<model>/<attempts>" (names percent-encoded, so no two values collide), and the
order itself in its dynamic metadata (namespace gpu_router, key priority_groups). Each header
value has its own route, matched on the exact value: its priority_group cluster specifier holds
one group per provider that may serve the model under the policy and reads the request's order
from that metadata, so attempt n goes to the n-th provider ext_proc named (failover_route.py),
and its retry policy allows attempts - 1 retries (the specifier would stay on the last provider
after that). Should the metadata name a provider the route does not hold (ext_proc still on the
previous policy during a rollout), Envoy skips it; with none left it walks the route's own
order: the fallback route's (fitting providers in the strategy's order), then the other fitting
ones. Exact matches never overlap, so their order does not matter; the fallback routes (no
header) come after them.

Route count: per policy and model, min(max_fallbacks + 1, P) routes with P providers able to
serve it, each with P priority groups: the config grows linearly with providers, and a request
matches one of a few routes whatever their number. Two fallback routes per policy and model
more. More than MAX_ROUTES is refused: Envoy matches routes in order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from urllib.parse import quote

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc_pb2
from envoy.config.route.v3 import route_pb2
from envoy.type.matcher.v3 import string_pb2

from control_plane.policy.model import Policy, RoutingConfig
from control_plane.translate.errors import TranslationError
from control_plane.translate.failover_route import failover_route
from control_plane.translate.fallback_routes import (
    fallback_routes,
    provider_order,
    usable_providers,
)
from control_plane.translate.names import (
    CLIENT_HEADERS_DROPPED,
    CLIENT_HEADERS_OVERWRITTEN,
    METADATA_NAMESPACE,
    ROUTE_CONFIG,
    ROUTE_HEADER,
)
from control_plane.translate.settings import EdgeSettings

_EXT_PROC_REASON = f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:reason)%"
MAX_ROUTES = 5000


def route_header_value(policy: str, model: str, attempts: int) -> str:
    """The route header naming `policy`'s route for `model` and an order of `attempts`
    providers (ext_proc's request.py builds the same)."""
    return f"{quote(policy, safe='')}/{quote(model, safe='')}/{attempts}"


def check_weights(config: RoutingConfig, weights: Mapping[str, int] | None) -> None:
    """Fleet weights name only the policy's providers, none negative."""
    if weights is None:
        return
    unknown = sorted(set(weights) - {p.name for p in config.providers})
    if unknown:
        raise TranslationError(f"fallback weights name unknown providers: {', '.join(unknown)}")
    if any(w < 0 for w in weights.values()):
        raise TranslationError(f"fallback weights must not be negative: {dict(weights)}")


def route_configuration(
    config: RoutingConfig, settings: EdgeSettings, weights: Mapping[str, int] | None = None
) -> route_pb2.RouteConfiguration:
    """`weights` (provider -> weight, 0 leaves it out) orders the fallback routes; None means
    policy order."""
    if not config.policies:
        raise TranslationError("the routes need at least one policy (the last is the catch-all)")
    check_weights(config, weights)
    routes = [
        route
        for policy in config.policies
        for route in _policy_routes(config, policy, settings, weights)
    ]
    routes += fallback_routes(config, settings, weights)
    if len(routes) > MAX_ROUTES:
        raise TranslationError(
            f"the policies need {len(routes)} routes (per policy and model, max_fallbacks + 1 "
            f"and two fallback routes), more than {MAX_ROUTES}: use fewer policies or models, or "
            f"lower max_fallbacks"
        )
    return route_pb2.RouteConfiguration(
        name=ROUTE_CONFIG,
        virtual_hosts=[
            rc_pb2.VirtualHost(
                name="gpu-router",
                domains=["*"],
                routes=routes,
                # Applied once the route is chosen: no provider sees our routing header, nor
                # the client headers that would choose the operator's accounts or break
                # accounting (names.py says why each).
                request_headers_to_remove=[ROUTE_HEADER, *CLIENT_HEADERS_DROPPED],
                request_headers_to_add=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key=name, value=value),
                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                    for name, (value, _why) in CLIENT_HEADERS_OVERWRITTEN.items()
                ],
            )
        ],
    )


def _policy_routes(
    config: RoutingConfig,
    policy: Policy,
    settings: EdgeSettings,
    weights: Mapping[str, int] | None,
) -> Iterator[rc_pb2.Route]:
    """The routes ext_proc's answers name, for every model whatever the policy's match.models: a
    client's forced policy (clients.py) decides any model the client may use. Their own order
    (when ext_proc names none the route holds) is the fallback route's, then the other fitting
    providers."""
    for model in config.models:
        first = provider_order(config, policy, model, weights)
        groups = tuple(dict.fromkeys((*first, *usable_providers(config, policy, model))))
        for attempts in range(1, min(policy.max_fallbacks + 1, len(groups)) + 1):
            value = route_header_value(policy.name, model.name, attempts)
            match = rc_pb2.RouteMatch(
                prefix="/",
                headers=[
                    rc_pb2.HeaderMatcher(
                        name=ROUTE_HEADER, string_match=string_pb2.StringMatcher(exact=value)
                    )
                ],
            )
            yield failover_route(value, match, groups, policy, settings, _EXT_PROC_REASON,
                                 attempts, per_request=True)
