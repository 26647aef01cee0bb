"""The edge route table: one route per ranked order of providers ext_proc may pick, then the
fallback routes (fallback_routes.py) for requests ext_proc did not answer.

ext_proc ranks the providers able to serve a request (the winner, then at most the policy's
max_fallbacks fallbacks) and names that order in a request header, "<policy>/<p1>,<p2>,...". Each
value it can set has its own route, matched on the exact value, whose priority_group cluster
specifier sends attempt n to provider n (failover_route.py). Exact matches never overlap, so their
order does not matter; the fallback routes (no header) come after them.

Route count, per policy with P providers to choose from (its allow-list, else every provider) and
F = max_fallbacks: sum over k = 1..min(F + 1, P) of P!/(P - k)! (the ordered selections of k
distinct providers). P = 3, F = 2: 3 + 6 + 6 = 15; P = 5, F = 2: 85; P = 5, F = 4: 325. Two
fallback routes per policy and model more. More than MAX_ROUTES is refused: Envoy matches routes
in order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc_pb2
from envoy.config.route.v3 import route_pb2
from envoy.type.matcher.v3 import string_pb2

from control_plane.policy.model import Policy, RoutingConfig
from control_plane.translate.errors import TranslationError
from control_plane.translate.failover_route import failover_route
from control_plane.translate.fallback_routes import fallback_routes
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


def route_header_value(policy: str, order: Sequence[str]) -> str:
    """The route header naming `policy`'s route for this ranked provider order."""
    return f"{policy}/{','.join(order)}"


def provider_orders(providers: Sequence[str], max_fallbacks: int) -> Iterator[tuple[str, ...]]:
    """Every ranked order ext_proc may pick: a winner and up to `max_fallbacks` fallbacks, all
    distinct, shortest first."""
    for length in range(1, min(max_fallbacks + 1, len(providers)) + 1):
        yield from itertools.permutations(providers, length)


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
        route for policy in config.policies for route in _policy_routes(config, policy, settings)
    ]
    routes += fallback_routes(config, settings, weights)
    if len(routes) > MAX_ROUTES:
        raise TranslationError(
            f"the policies need {len(routes)} routes (one per ranked order of providers), more "
            f"than {MAX_ROUTES}: narrow the policies' providers or lower their max_fallbacks"
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
    config: RoutingConfig, policy: Policy, settings: EdgeSettings
) -> Iterator[rc_pb2.Route]:
    providers = policy.providers or tuple(p.name for p in config.providers)
    for order in provider_orders(providers, policy.max_fallbacks):
        value = route_header_value(policy.name, order)
        match = rc_pb2.RouteMatch(
            prefix="/",
            headers=[
                rc_pb2.HeaderMatcher(
                    name=ROUTE_HEADER, string_match=string_pb2.StringMatcher(exact=value)
                )
            ],
        )
        yield failover_route(value, match, order, policy, settings, _EXT_PROC_REASON)
