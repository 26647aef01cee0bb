"""Provider and ext_proc clusters: discovery, TLS, protocols, fault machinery, upstream filters."""

from __future__ import annotations

from dataclasses import replace

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.credential_injector.v3 import credential_injector_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.http.injected_credentials.generic.v3 import generic_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as upstream_http_pb2
from translate_fixtures import provider, routing_config

from control_plane.policy.model import (
    Credential,
    Failover,
    HealthCheck,
    Model,
    OutlierDetection,
    Provider,
)
from control_plane.translate.clusters import (
    HTTP_PROTOCOL_OPTIONS,
    all_clusters,
    ext_proc_cluster,
    provider_cluster,
    retries_in_flight,
)
from control_plane.translate.settings import EdgeSettings
from control_plane.translate.upstream_lua import provider_lua

SETTINGS = EdgeSettings()
LUA = "-- the provider's rewrite"


def cluster_of(provider: Provider, max_retries: int = 100, max_waiting: int = 300
               ) -> cluster_pb2.Cluster:
    return provider_cluster(provider, SETTINGS, lua_source=LUA, max_retries=max_retries,
                            max_waiting=max_waiting)


def protocol_options(cluster: cluster_pb2.Cluster) -> upstream_http_pb2.HttpProtocolOptions:
    options = upstream_http_pb2.HttpProtocolOptions()
    assert cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].Unpack(options)
    return options


def tls_context(cluster: cluster_pb2.Cluster) -> tls_pb2.UpstreamTlsContext:
    context = tls_pb2.UpstreamTlsContext()
    assert cluster.transport_socket.name == "envoy.transport_sockets.tls"
    assert cluster.transport_socket.typed_config.Unpack(context)
    return context


def test_ip_and_localhost_providers_use_eds_from_ads() -> None:
    for base_url in ("http://127.0.0.1:8101", "http://localhost:8101", "http://[::1]:8101"):
        cluster = cluster_of(provider("p", base_url))
        assert cluster.type == cluster_pb2.Cluster.EDS
        assert cluster.eds_cluster_config.eds_config.HasField("ads")
        assert not cluster.HasField("load_assignment")


def test_dns_providers_use_strict_dns_with_inline_endpoint() -> None:
    cluster = cluster_of(provider("p", "https://api.example.com"))
    assert cluster.type == cluster_pb2.Cluster.STRICT_DNS
    address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("api.example.com", 443)


def test_https_gets_tls_with_sni_name_check_ca_and_alpn_auto_config() -> None:
    cluster = cluster_of(provider("p", "https://api.example.com"))
    context = tls_context(cluster)
    assert context.sni == "api.example.com"
    assert list(context.common_tls_context.alpn_protocols) == ["h2", "http/1.1"]
    validation = context.common_tls_context.validation_context
    assert validation.trusted_ca.filename == SETTINGS.trusted_ca_file
    (san,) = validation.match_typed_subject_alt_names
    assert san.san_type == common_pb2.SubjectAltNameMatcher.DNS
    assert san.matcher.exact == "api.example.com"
    options = protocol_options(cluster)
    assert options.HasField("auto_config")
    assert options.auto_config.http2_protocol_options.max_concurrent_streams.value == 1


def test_https_to_an_ip_checks_the_ip_san_and_sends_no_sni() -> None:
    context = tls_context(cluster_of(provider("p", "https://10.0.0.7:8443")))
    assert context.sni == ""
    (san,) = context.common_tls_context.validation_context.match_typed_subject_alt_names
    assert san.san_type == common_pb2.SubjectAltNameMatcher.IP_ADDRESS
    assert san.matcher.exact == "10.0.0.7"


def test_plain_http_is_explicit_http1_without_tls() -> None:
    cluster = cluster_of(provider("p", "http://127.0.0.1:8101"))
    assert not cluster.HasField("transport_socket")
    options = protocol_options(cluster)
    assert options.explicit_http_config.HasField("http_protocol_options")


def test_fault_machinery_follows_the_provider_and_the_retry_bound() -> None:
    p = replace(
        provider("p", "http://127.0.0.1:8101", max_concurrency=17, health_check_path="/healthz"),
        health_check=HealthCheck(
            interval_ms=1500, timeout_ms=700, unhealthy_threshold=4, healthy_threshold=2
        ),
        outlier_detection=OutlierDetection(
            consecutive_5xx=6,
            consecutive_gateway_failure=4,
            consecutive_local_origin_failure=2,
            failure_percentage_threshold=40,
            failure_percentage_minimum_hosts=1,
            failure_percentage_request_volume=10,
            interval_ms=2500,
            base_ejection_time_ms=12000,
        ),
    )
    cluster = cluster_of(p, max_retries=250, max_waiting=400)
    assert cluster.connect_timeout.seconds == 5
    assert cluster.per_connection_buffer_limit_bytes.value == 32 * 1024 * 1024
    (check,) = cluster.health_checks
    assert check.http_health_check.path == "/healthz"
    assert [
        check.interval.ToMilliseconds(),
        check.timeout.ToMilliseconds(),
        check.no_traffic_interval.ToMilliseconds(),
    ] == [1500, 700, 1500]
    assert (check.unhealthy_threshold.value, check.healthy_threshold.value) == (4, 2)
    (thresholds,) = cluster.circuit_breakers.thresholds
    # Connections of one request each cap the provider, and what is over them waits: Envoy
    # never retries a request max_requests refused, so that limit must not bind.
    assert (thresholds.max_connections.value, thresholds.max_pending_requests.value) == (17, 400)
    assert thresholds.max_requests.value == 2**32 - 1
    # An idle connection holds a slot of the cap for its worker thread only: it gives it back.
    assert protocol_options(cluster).common_http_protocol_options.idle_timeout.seconds == 2
    assert thresholds.max_retries.value == 250
    # No retry budget: Envoy would compute it on the failing cluster's shrinking active count.
    assert not thresholds.HasField("retry_budget")
    outlier = cluster.outlier_detection
    assert [
        outlier.consecutive_5xx.value,
        outlier.consecutive_gateway_failure.value,
        outlier.consecutive_local_origin_failure.value,
        outlier.failure_percentage_threshold.value,
        outlier.failure_percentage_minimum_hosts.value,
        outlier.failure_percentage_request_volume.value,
    ] == [6, 4, 2, 40, 1, 10]
    assert outlier.split_external_local_origin_errors
    assert [
        outlier.enforcing_consecutive_gateway_failure.value,
        outlier.enforcing_consecutive_local_origin_failure.value,
        outlier.enforcing_failure_percentage.value,
        outlier.enforcing_failure_percentage_local_origin.value,
        outlier.max_ejection_percent.value,
    ] == [100] * 5
    assert outlier.interval.ToMilliseconds() == 2500
    assert outlier.base_ejection_time.ToMilliseconds() == 12000
    assert not cluster.common_lb_config.HasField("healthy_panic_threshold")
    assert cluster.metadata.filter_metadata["gpu_router"]["provider"] == "p"


def test_a_watched_provider_is_ejected_on_its_first_failure_and_the_rest_keep_the_policy() -> None:
    a = replace(provider("a", "http://127.0.0.1:8101"), outlier_detection=OutlierDetection(
        consecutive_5xx=6, consecutive_gateway_failure=4, consecutive_local_origin_failure=2,
        base_ejection_time_ms=12000))
    config = routing_config(a, provider("b", "http://127.0.0.1:8102"))

    clusters = all_clusters(config, SETTINGS, watched=frozenset({"a"}))

    def counts(name: str) -> tuple[int, int, int, int]:
        outlier = clusters[name].outlier_detection
        return (outlier.consecutive_5xx.value, outlier.consecutive_gateway_failure.value,
                outlier.consecutive_local_origin_failure.value, outlier.base_ejection_time.ToMilliseconds())

    assert counts("a") == (1, 1, 1, 12000)
    assert counts("b") == (5, 3, 3, 10000)  # the policy's (here the defaults)
    assert all_clusters(config, SETTINGS)["a"].outlier_detection.consecutive_5xx.value == 6


def test_retries_in_flight_default_to_what_the_fleet_accepts_and_follow_the_policy() -> None:
    a = replace(provider("a", "http://127.0.0.1:8101"), max_concurrency=40)
    b = replace(provider("b", "http://127.0.0.1:8102"), max_concurrency=24)
    config = routing_config(a, b)
    assert retries_in_flight(config) == 64
    clusters = all_clusters(config, SETTINGS)
    assert [clusters[n].circuit_breakers.thresholds[0].max_retries.value for n in "ab"] == [64, 64]

    capped = replace(config, failover=Failover(max_retries_in_flight=7))
    assert retries_in_flight(capped) == 7
    assert all_clusters(capped, SETTINGS)["b"].circuit_breakers.thresholds[0].max_retries.value == 7


def test_credentialed_provider_rewrites_then_injects_from_its_sds_secret_then_codec() -> None:
    credential = Credential(env="KEY", header="x-api-key", prefix="")
    cluster = cluster_of(provider("p", "http://127.0.0.1:8101", credential=credential))
    lua_filter, injector_filter, codec = protocol_options(cluster).http_filters
    assert lua_filter.name == "envoy.filters.http.lua"
    assert codec.name == "envoy.filters.http.upstream_codec"
    assert injector_filter.name == "envoy.filters.http.credential_injector"
    injector = credential_injector_pb2.CredentialInjector()
    assert injector_filter.typed_config.Unpack(injector)
    assert injector.overwrite
    assert injector.credential.name == "envoy.http.injected_credentials.generic"
    generic = generic_pb2.Generic()
    assert injector.credential.typed_config.Unpack(generic)
    assert generic.header == "x-api-key"
    assert generic.credential.name == "gpu-router.credential.p"
    assert generic.credential.sds_config.HasField("ads")


def test_provider_without_credential_has_the_rewrite_and_the_codec() -> None:
    cluster = cluster_of(provider("p", "http://127.0.0.1:8101"))
    assert [f.name for f in protocol_options(cluster).http_filters] == [
        "envoy.filters.http.lua",
        "envoy.filters.http.upstream_codec",
    ]


def test_the_rewrite_is_the_given_lua() -> None:
    options = protocol_options(cluster_of(provider("p", "http://127.0.0.1:8101/api/")))
    config = lua_pb2.Lua()
    assert options.http_filters[0].typed_config.Unpack(config)
    assert config.default_source_code.inline_string == LUA


def test_every_cluster_knows_the_aliases_and_strips_every_providers_credential_header() -> None:
    config = routing_config(
        provider("a", "http://127.0.0.1:1", credential=Credential(env="K", header="x-api-key")),
        provider("b", "http://127.0.0.1:2", model_ids={"m": "vendor/m"}),
        models=(Model(name="m", aliases=("m-alias",)),),
    )
    expected = provider_lua(
        config.providers[1], {"m": ("m-alias",)}, ("authorization", "x-api-key")
    )
    options = protocol_options(all_clusters(config, SETTINGS)["b"])
    lua = lua_pb2.Lua()
    assert options.http_filters[0].typed_config.Unpack(lua)
    assert lua.default_source_code.inline_string == expected


def test_ext_proc_cluster_is_static_http2_on_the_configured_port() -> None:
    cluster = ext_proc_cluster(EdgeSettings(ext_proc_endpoints=(("127.0.0.1", 50999),)))
    assert cluster.name == "gpu-router.ext_proc"
    assert cluster.type == cluster_pb2.Cluster.STATIC
    assert cluster.connect_timeout.seconds == 1
    address = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("127.0.0.1", 50999)
    assert protocol_options(cluster).explicit_http_config.HasField("http2_protocol_options")
    assert cluster.per_connection_buffer_limit_bytes.value == SETTINGS.buffer_limit_bytes


def test_an_ext_proc_replica_that_fails_one_connection_is_ejected_at_once() -> None:
    outlier = ext_proc_cluster(SETTINGS).outlier_detection
    assert outlier.split_external_local_origin_errors
    assert outlier.consecutive_local_origin_failure.value == 1
    assert outlier.enforcing_consecutive_local_origin_failure.value == 100
    assert outlier.max_ejection_percent.value == 100


def test_all_clusters_are_named_after_providers_plus_ext_proc() -> None:
    config = routing_config(
        provider("a", "http://127.0.0.1:1"), provider("b", "https://b.example.com")
    )
    assert list(all_clusters(config, SETTINGS)) == ["a", "b", "gpu-router.ext_proc"]


def test_ext_proc_replicas_are_all_endpoints_of_one_cluster() -> None:
    by_ip = ext_proc_cluster(EdgeSettings(ext_proc_endpoints=(("127.0.0.1", 1), ("127.0.0.1", 2))))
    by_name = ext_proc_cluster(
        EdgeSettings(ext_proc_endpoints=(("ext-proc-1", 50051), ("ext-proc-2", 50051)))
    )
    assert by_ip.type == cluster_pb2.Cluster.STATIC
    assert by_name.type == cluster_pb2.Cluster.STRICT_DNS
    (locality,) = by_name.load_assignment.endpoints
    addresses = [e.endpoint.address.socket_address for e in locality.lb_endpoints]
    assert [(a.address, a.port_value) for a in addresses] == [
        ("ext-proc-1", 50051),
        ("ext-proc-2", 50051),
    ]
