"""The edge route table: one route per ranked order of providers ext_proc may pick, then a fallback.

ext_proc ranks the providers able to serve a request (the winner, then at most the policy's
max_fallbacks fallbacks) and names that order in a request header, "<policy>/<p1>,<p2>,...". Each
value it can set has its own route, matched on the exact value, whose priority_group cluster
specifier sends attempt n to provider n; its retry policy moves on after a 5xx, a reset, a refused
connection or stream, a 429 or a per-try timeout, and each attempt is fitted to its provider by
that cluster's upstream filters (clusters.py). Exact matches never overlap, so their order does
not matter; the fallback route (no header) comes last and is reached only when ext_proc did not
answer (failure_mode_allow): it walks the providers by the weights the control plane pushes.

Route count, per policy with P providers to choose from (its allow-list, else every provider) and
F = max_fallbacks: sum over k = 1..min(F + 1, P) of P!/(P - k)! (the ordered selections of k
distinct providers). P = 3, F = 2: 3 + 6 + 6 = 15; P = 5, F = 2: 85; P = 5, F = 4: 325. One
fallback route more in all. More than MAX_ROUTES is refused: Envoy matches routes in order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence

from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.config.route.v3 import route_components_pb2 as rc_pb2
from envoy.config.route.v3 import route_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import wrappers_pb2

from control_plane.policy.model import Policy, RoutingConfig
from control_plane.translate.envoy_api import milliseconds, packed, seconds
from control_plane.translate.errors import TranslationError
from control_plane.translate.names import (
    METADATA_NAMESPACE,
    PROVIDER_RESPONSE_HEADER,
    REASON_RESPONSE_HEADER,
    ROUTE_CONFIG,
    ROUTE_HEADER,
)
from control_plane.translate.newer_api import (
    PRIORITY_GROUP_PLUGIN,
    priority_groups,
    refresh_cluster_on_retry,
)
from control_plane.translate.settings import EdgeSettings

FALLBACK_REASON = "fallback: ext_proc unavailable"
_EXT_PROC_REASON = f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:reason)%"
MAX_ROUTES = 5000
RETRY_ON = "5xx,reset,connect-failure,refused-stream,retriable-status-codes"
RETRIABLE_STATUS_CODES = (429,)
RETRY_BACK_OFF_MS = (10, 20)
"""(base, max): enough to spread a burst of retries, too little for a client to notice."""


def route_header_value(policy: str, order: Sequence[str]) -> str:
    """The route header naming `policy`'s route for this ranked provider order."""
    return f"{policy}/{','.join(order)}"


def provider_orders(providers: Sequence[str], max_fallbacks: int) -> Iterator[tuple[str, ...]]:
    """Every ranked order ext_proc may pick: a winner and up to `max_fallbacks` fallbacks, all
    distinct, shortest first."""
    for length in range(1, min(max_fallbacks + 1, len(providers)) + 1):
        yield from itertools.permutations(providers, length)


def fallback_order(config: RoutingConfig, weights: Mapping[str, int] | None) -> tuple[str, ...]:
    """Providers by weight, highest first (ties in policy order; weight 0 or absent leaves one
    out); every provider in policy order when `weights` is None or all weights are 0."""
    names = tuple(p.name for p in config.providers)
    if weights is None:
        return names
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise TranslationError(f"fallback weights name unknown providers: {', '.join(unknown)}")
    if any(w < 0 for w in weights.values()):
        raise TranslationError(f"fallback weights must not be negative: {dict(weights)}")
    ranked = sorted((n for n in names if weights.get(n, 0) > 0), key=lambda n: -weights[n])
    return tuple(ranked) or names


def route_configuration(
    config: RoutingConfig, settings: EdgeSettings, weights: Mapping[str, int] | None = None
) -> route_pb2.RouteConfiguration:
    """`weights` (provider -> weight, 0 leaves it out) orders the fallback route; None means
    policy order."""
    if not config.policies:
        raise TranslationError("the routes need at least one policy (the last is the catch-all)")
    routes = [
        route for policy in config.policies for route in _policy_routes(config, policy, settings)
    ]
    if len(routes) > MAX_ROUTES:
        raise TranslationError(
            f"the policies need {len(routes)} routes (one per ranked order of providers), more "
            f"than {MAX_ROUTES}: narrow the policies' providers or lower their max_fallbacks"
        )
    catch_all = config.policies[-1]
    order = fallback_order(config, weights)[: catch_all.max_fallbacks + 1]
    fallback = rc_pb2.RouteMatch(prefix="/")
    routes.append(
        _failover_route("fallback", fallback, order, catch_all, settings, FALLBACK_REASON)
    )
    return route_pb2.RouteConfiguration(
        name=ROUTE_CONFIG,
        virtual_hosts=[
            rc_pb2.VirtualHost(
                name="gpu-router",
                domains=["*"],
                routes=routes,
                # Applied once the route is chosen: no provider sees our routing header.
                request_headers_to_remove=[ROUTE_HEADER],
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
        yield _failover_route(value, match, order, policy, settings, _EXT_PROC_REASON)


def _failover_route(
    name: str,
    match: rc_pb2.RouteMatch,
    order: Sequence[str],
    policy: Policy,
    settings: EdgeSettings,
    reason: str,
) -> rc_pb2.Route:
    """Attempt n of a request to order[n], on the retry terms of `policy`; `reason` is the
    x-gpu-router-reason response header."""
    specifier = extension_pb2.TypedExtensionConfig(
        name=PRIORITY_GROUP_PLUGIN, typed_config=packed(priority_groups(order))
    )
    return rc_pb2.Route(
        name=name,
        match=match,
        route=rc_pb2.RouteAction(
            inline_cluster_specifier_plugin=rc_pb2.ClusterSpecifierPlugin(extension=specifier),
            timeout=seconds(settings.upstream_timeout_s),
            auto_host_rewrite=wrappers_pb2.BoolValue(value=True),
            retry_policy=_retry_policy(len(order), policy.per_try_timeout_ms),
        ),
        response_headers_to_add=[
            _response_header(PROVIDER_RESPONSE_HEADER, "%UPSTREAM_CLUSTER%"),
            _response_header(REASON_RESPONSE_HEADER, reason),
        ],
        # The router keeps the body for retries, and the upstream Lua filter may read it whole
        # to rewrite the model: a 1 MiB+ prompt must not 413.
        request_body_buffer_limit=wrappers_pb2.UInt64Value(value=settings.buffer_limit_bytes),
    )


def _retry_policy(attempts: int, per_try_timeout_ms: int) -> rc_pb2.RetryPolicy:
    """One retry per provider after the first. No rate_limited_retry_back_off: it would wait out
    a 429's Retry-After, whereas the next attempt goes to another provider."""
    base, most = RETRY_BACK_OFF_MS
    return refresh_cluster_on_retry(
        rc_pb2.RetryPolicy(
            retry_on=RETRY_ON,
            retriable_status_codes=RETRIABLE_STATUS_CODES,
            num_retries=wrappers_pb2.UInt32Value(value=attempts - 1),
            per_try_timeout=milliseconds(per_try_timeout_ms),
            retry_back_off=rc_pb2.RetryPolicy.RetryBackOff(
                base_interval=milliseconds(base), max_interval=milliseconds(most)
            ),
        )
    )


def _response_header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
