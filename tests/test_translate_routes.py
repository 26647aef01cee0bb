"""The route table: ext_proc's pick, then the weighted fallback."""

from __future__ import annotations

import re

import pytest
from translate_fixtures import provider, routing_config

from control_plane.translate.errors import TranslationError
from control_plane.translate.routes import FALLBACK_REASON, route_configuration
from control_plane.translate.settings import EdgeSettings

CONFIG = routing_config(
    provider("a", "http://127.0.0.1:1"),
    provider("b-2", "http://127.0.0.1:2"),
    provider("c", "http://127.0.0.1:3"),
)


def routes(weights=None):
    table = route_configuration(CONFIG, EdgeSettings(upstream_timeout_s=123), weights)
    assert table.name == "gpu-router.routes"
    (host,) = table.virtual_hosts
    assert list(host.domains) == ["*"]
    return host.routes


def response_headers(route) -> dict[str, str]:
    return {h.header.key: h.header.value for h in route.response_headers_to_add}


def test_first_route_follows_the_cluster_header_only_for_provider_names() -> None:
    picked = routes()[0]
    assert picked.match.prefix == "/"
    (matcher,) = picked.match.headers
    assert matcher.name == "x-gpu-router-cluster"
    pattern = re.compile(matcher.string_match.safe_regex.regex)
    assert all(pattern.fullmatch(name) for name in ("a", "b-2", "c"))
    assert not any(
        pattern.fullmatch(name) for name in ("gpu-router.xds", "gpu-router.ext_proc", "ab", "")
    )
    assert picked.route.cluster_header == "x-gpu-router-cluster"
    assert picked.route.timeout.seconds == 123
    assert list(picked.request_headers_to_remove) == ["x-gpu-router-cluster"]
    assert response_headers(picked) == {
        "x-gpu-router-provider": "%UPSTREAM_CLUSTER%",
        "x-gpu-router-reason": "%DYNAMIC_METADATA(gpu_router:reason)%",
    }


def test_fallback_spreads_evenly_over_all_providers_by_default() -> None:
    fallback = routes()[1]
    assert fallback.match.prefix == "/" and not fallback.match.headers
    assert fallback.route.timeout.seconds == 123
    weights = {c.name: c.weight.value for c in fallback.route.weighted_clusters.clusters}
    assert weights == {"a": 1, "b-2": 1, "c": 1}
    assert response_headers(fallback) == {
        "x-gpu-router-provider": "%UPSTREAM_CLUSTER%",
        "x-gpu-router-reason": FALLBACK_REASON,
    }


def test_both_routes_buffer_request_bodies_up_to_the_buffer_limit() -> None:
    table = route_configuration(CONFIG, EdgeSettings(buffer_limit_bytes=12345))
    assert [r.request_body_buffer_limit.value for r in table.virtual_hosts[0].routes] == [
        12345,
        12345,
    ]


def test_fallback_weights_are_applied_and_zero_drains_a_provider() -> None:
    fallback = routes({"a": 5, "b-2": 0, "c": 2})[1]
    assert {c.name: c.weight.value for c in fallback.route.weighted_clusters.clusters} == {
        "a": 5,
        "c": 2,
    }


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"a": 1, "zz": 1}, "unknown providers: zz"),
        ({"a": 0}, "positive weight"),
        ({"a": -1}, "negative"),
    ],
)
def test_bad_fallback_weights_are_rejected(weights: dict[str, int], message: str) -> None:
    with pytest.raises(TranslationError, match=message):
        routes(weights)
