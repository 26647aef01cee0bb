"""One routed request's walk over a ranked order of providers, inside the client's request.

Attempt n goes to order[n] (a priority_group cluster specifier, refreshed on every retry), so a
retry always lands on a different provider. The order is either the route's own (fallback routes)
or, on a policy's routes, the request's: ext_proc names it in the dynamic metadata the specifier
reads (override_metadata_namespace), among the groups the route configures, one per provider.
What bounds the retrying:

- per request: at most `attempts` attempts (num_retries = attempts - 1, at most max_fallbacks);
- per provider: its cap at this edge (provider_cap.py), which guards the provider a retry goes to;
- per edge: the max_retries circuit breaker (provider_cap.retries_in_flight).

Envoy requires a positive retry back-off, so it is 1 ms: the next attempt goes to another
provider, and sleeping before it would only add the first provider's failure to the client's wait.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.config.route.v3 import route_components_pb2 as rc_pb2
from google.protobuf import wrappers_pb2

from control_plane.policy.model import Policy
from control_plane.translate.envoy_api import milliseconds, packed, seconds
from control_plane.translate.names import (
    METADATA_NAMESPACE,
    PROVIDER_RESPONSE_HEADER,
    REASON_RESPONSE_HEADER,
)
from control_plane.translate.newer_api import (
    PRIORITY_GROUP_PLUGIN,
    priority_groups,
    refresh_cluster_on_retry,
)
from control_plane.translate.settings import EdgeSettings

RETRY_ON = "5xx,reset,connect-failure,refused-stream,retriable-status-codes"
RETRIABLE_STATUS_CODES = (429,)
RETRY_BACK_OFF_MS = 1
"""The smallest back-off Envoy accepts (it must be > 0): no sleep worth the name between
attempts that go to different providers."""


def failover_route(
    name: str,
    match: rc_pb2.RouteMatch,
    order: Sequence[str],
    policy: Policy,
    settings: EdgeSettings,
    reason: str,
    attempts: int,
    *,
    per_request: bool = False,
) -> rc_pb2.Route:
    """Attempt n of a request to order[n], on the retry terms of `policy`, for `attempts`
    attempts; `per_request`: to the n-th provider ext_proc's metadata names instead (its
    namespace, METADATA_NAMESPACE). `reason` is the x-gpu-router-reason response header."""
    groups = priority_groups(order, METADATA_NAMESPACE if per_request else "")
    specifier = extension_pb2.TypedExtensionConfig(
        name=PRIORITY_GROUP_PLUGIN, typed_config=packed(groups)
    )
    return rc_pb2.Route(
        name=name,
        match=match,
        route=rc_pb2.RouteAction(
            inline_cluster_specifier_plugin=rc_pb2.ClusterSpecifierPlugin(extension=specifier),
            timeout=seconds(settings.upstream_timeout_s),
            auto_host_rewrite=wrappers_pb2.BoolValue(value=True),
            retry_policy=_retry_policy(attempts, policy.per_try_timeout_ms),
        ),
        response_headers_to_add=[
            response_header(PROVIDER_RESPONSE_HEADER, "%UPSTREAM_CLUSTER%"),
            response_header(REASON_RESPONSE_HEADER, reason),
        ],
        # The router keeps the body for retries, and the upstream Lua filter may read it whole
        # to rewrite the model: a 1 MiB+ prompt must not 413.
        request_body_buffer_limit=wrappers_pb2.UInt64Value(value=settings.buffer_limit_bytes),
    )


def _retry_policy(attempts: int, per_try_timeout_ms: int) -> rc_pb2.RetryPolicy:
    """One retry per provider after the first. No rate_limited_retry_back_off: it would wait out
    a 429's Retry-After, whereas the next attempt goes to another provider."""
    return refresh_cluster_on_retry(
        rc_pb2.RetryPolicy(
            retry_on=RETRY_ON,
            retriable_status_codes=RETRIABLE_STATUS_CODES,
            num_retries=wrappers_pb2.UInt32Value(value=attempts - 1),
            per_try_timeout=milliseconds(per_try_timeout_ms),
            retry_back_off=rc_pb2.RetryPolicy.RetryBackOff(
                base_interval=milliseconds(RETRY_BACK_OFF_MS),
                max_interval=milliseconds(RETRY_BACK_OFF_MS),
            ),
        )
    )


def response_header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
