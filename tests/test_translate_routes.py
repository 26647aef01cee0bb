"""The route table: per policy and model, one route per length of the order ext_proc picks (the
order itself rides in the request's metadata), then the fallback routes
(test_translate_fallback_routes.py)."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from translate_fixtures import attempt_order, priority_group_specifier, provider, routing_config

from control_plane.policy.model import Model, Policy
from control_plane.translate.errors import TranslationError
from control_plane.translate.names import CLIENT_HEADERS_DROPPED
from control_plane.translate.routes import MAX_ROUTES, route_configuration, route_header_value
from control_plane.translate.settings import EdgeSettings

MODEL = Model(name="m/1", min_gpu_memory_gb=1)
PROVIDERS = (
    provider("a", "http://127.0.0.1:1", model_ids={"m/1": "m"}),
    provider("b-2", "http://127.0.0.1:2", model_ids={"m/1": "m"}),
    provider("c", "http://127.0.0.1:3", model_ids={"m/1": "m"}),
)
CONFIG = routing_config(
    *PROVIDERS,
    models=(MODEL,),
    policies=(
        Policy(name="chat", providers=("c", "a"), max_fallbacks=1, per_try_timeout_ms=1500),
        Policy(name="batch/x", max_fallbacks=2, per_try_timeout_ms=4000),
    ),
)
SETTINGS = EdgeSettings(upstream_timeout_s=123, buffer_limit_bytes=12345)


def routes(config=CONFIG, weights=None):
    table = route_configuration(config, SETTINGS, weights)
    assert table.name == "gpu-router.routes"
    (host,) = table.virtual_hosts
    assert list(host.domains) == ["*"]
    assert list(host.request_headers_to_remove) == [
        "x-gpu-router-route", *CLIENT_HEADERS_DROPPED
    ]
    assert [(h.header.key, h.header.value, h.append_action)
            for h in host.request_headers_to_add] == [
        ("accept-encoding", "identity", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
    ]
    return host.routes


def forwarding_routes(config=CONFIG):
    """The routes that go to providers (the rest answer from Envoy itself)."""
    found = [route for route in routes(config) if route.HasField("route")]
    assert found
    return found


def by_name(config=CONFIG, weights=None):
    return {route.name: route for route in routes(config, weights)}


def response_headers(route) -> dict[str, str]:
    return {h.header.key: h.header.value for h in route.response_headers_to_add}


def test_header_value_is_policy_model_attempts_each_name_encoded() -> None:
    assert route_header_value("batch/x", "m/1", 2) == "batch%2Fx/m%2F1/2"
    # Names holding the separator cannot make two routes match one value.
    assert route_header_value("a/b", "c", 1) != route_header_value("a", "b/c", 1)


@pytest.mark.parametrize(("count", "fallbacks"), [(3, 2), (4, 2), (5, 4), (5, 0), (50, 2)])
def test_route_count_grows_with_fallbacks_not_providers(count: int, fallbacks: int) -> None:
    config = routing_config(
        *(provider(f"p{i}", f"http://127.0.0.1:{i + 1}", model_ids={"m/1": "m"})
          for i in range(count)),
        models=(MODEL,),
        policies=(Policy(name="only", max_fallbacks=fallbacks),),
    )
    # Two fallback routes for the one model, /v1/models and the two 404s.
    assert len(routes(config)) == min(fallbacks + 1, count) + 2 + 3
    for route in forwarding_routes(config)[: min(fallbacks + 1, count)]:
        assert len(attempt_order(route)) == count  # a group per provider: linear in providers


def test_a_route_per_model_and_order_length_walks_the_order_the_request_names() -> None:
    table = by_name()
    chat = [name for name in table if name.startswith("chat/")]
    assert chat == ["chat/m%2F1/1", "chat/m%2F1/2"]
    route = table["chat/m%2F1/2"]
    assert route.match.prefix == "/"
    (matcher,) = route.match.headers
    assert (matcher.name, matcher.string_match.exact) == ("x-gpu-router-route", "chat/m%2F1/2")
    # One group per provider that may serve the model under the policy; the request's order
    # comes from ext_proc's metadata.
    assert set(attempt_order(route)) == {"c", "a"}
    assert priority_group_specifier(route).override_metadata_namespace == "gpu_router"
    assert set(attempt_order(table["batch%2Fx/m%2F1/3"])) == {"a", "b-2", "c"}
    assert response_headers(route) == {
        "x-gpu-router-provider": "%UPSTREAM_CLUSTER%",
        "x-gpu-router-reason": "%DYNAMIC_METADATA(gpu_router:reason)%",
    }


def test_retries_move_down_the_order_on_the_policys_terms() -> None:
    table = by_name()
    policy = table["chat/m%2F1/2"].route.retry_policy
    assert policy.retry_on == "5xx,reset,connect-failure,refused-stream,retriable-status-codes"
    assert list(policy.retriable_status_codes) == [429]
    assert policy.num_retries.value == 1
    assert policy.per_try_timeout.ToMilliseconds() == 1500
    # No sleep worth the name: the next attempt goes to another provider (Envoy needs > 0).
    assert policy.retry_back_off.base_interval.ToMilliseconds() == 1
    assert policy.retry_back_off.max_interval.ToMilliseconds() == 1
    assert not policy.HasField("rate_limited_retry_back_off")
    assert table["chat/m%2F1/1"].route.retry_policy.num_retries.value == 0
    batch = table["batch%2Fx/m%2F1/3"].route.retry_policy
    assert (batch.num_retries.value, batch.per_try_timeout.ToMilliseconds()) == (2, 4000)


def test_without_a_usable_order_in_the_metadata_envoy_walks_the_fallback_order() -> None:
    """A route's own order (taken when ext_proc's metadata names a provider the route does
    not hold, as during a rollout) is the fallback route's, then the other fitting providers:
    with fleet weights, the heaviest first and those weighted 0 last."""
    weighted = by_name(weights={"a": 1, "b-2": 0, "c": 5})
    assert attempt_order(weighted["batch%2Fx/m%2F1/3"]) == ["c", "a", "b-2"]
    assert attempt_order(weighted["fallback/batch/x/m/1"])[:2] == ["c", "a"]
    assert attempt_order(by_name()["batch%2Fx/m%2F1/3"]) == ["a", "b-2", "c"]  # policy order


def test_retries_refresh_the_cluster() -> None:
    """refresh_cluster_on_retry (RetryPolicy field 14, a bool) is missing from the xds-protos
    stubs: it travels as an unknown field, tag 14 << 3 | varint, value 1. (That Envoy reads it
    is shown by test_translate_envoy.py: without it every retry would hit the same provider.)"""
    for route in forwarding_routes():
        assert route.route.retry_policy.SerializeToString().endswith(b"\x70\x01")


def test_every_route_has_the_timeout_host_rewrite_and_body_buffer() -> None:
    for route in forwarding_routes():
        assert route.route.timeout.seconds == 123
        assert route.route.auto_host_rewrite.value
        assert route.request_body_buffer_limit.value == 12345


@pytest.mark.parametrize(
    ("weights", "message"),
    [({"a": 1, "zz": 1}, "unknown providers: zz"), ({"a": -1}, "negative")],
)
def test_bad_fallback_weights_are_rejected(weights: dict[str, int], message: str) -> None:
    with pytest.raises(TranslationError, match=message):
        routes(weights=weights)


def test_too_many_routes_are_refused_with_the_way_out() -> None:
    models = tuple(Model(name=f"m{i}", min_gpu_memory_gb=1) for i in range(60))
    config = routing_config(
        provider("a", "http://127.0.0.1:1", model_ids={m.name: m.name for m in models}),
        models=models,
        policies=tuple(Policy(name=f"p{i}") for i in range(45)),
    )
    with pytest.raises(TranslationError, match=f"more than {MAX_ROUTES}: use fewer"):
        routes(config)


def test_a_config_without_policies_is_refused() -> None:
    with pytest.raises(TranslationError, match="at least one policy"):
        routes(routing_config(*PROVIDERS, policies=()))


@pytest.mark.parametrize(("policy", "model", "attempts"), [
    ("default", "llama-3.1-8b", 3), ("a/b", "m%1 x", 1), ("ünï", "m/2", 2),
])
def test_ext_proc_names_routes_and_the_order_as_the_translator_does(
        policy: str, model: str, attempts: int) -> None:
    """The wire contract between the deployables (a test may import both): the route header's
    value and the order's metadata key, written by ext_proc, read by the generated routes."""
    from control_plane.translate.names import ORDER_METADATA_KEY
    from control_plane.translate.names import ROUTE_HEADER as TRANSLATED_ROUTE_HEADER
    from ext_proc.request import ORDER_KEY, ROUTE_HEADER, _route_to

    (header,) = _route_to(policy, model, attempts).header_mutation.set_headers
    assert (header.header.key, header.header.raw_value.decode()) == (
        TRANSLATED_ROUTE_HEADER, route_header_value(policy, model, attempts))
    assert (ROUTE_HEADER, ORDER_KEY) == (TRANSLATED_ROUTE_HEADER, ORDER_METADATA_KEY)
