"""The ext_proc cluster's detection of a frozen, overloaded or not-yet-ready replica."""

from __future__ import annotations

from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as upstream_http_pb2

from control_plane.translate.clusters import ext_proc_cluster
from control_plane.translate.edge_secret_files import CONNECTION_MAX_AGE_S
from control_plane.translate.settings import EdgeSettings


def test_replicas_are_health_checked_over_grpc_health_often_with_or_without_traffic() -> None:
    (check,) = ext_proc_cluster(EdgeSettings()).health_checks
    assert check.grpc_health_check.service_name == "envoy.service.ext_proc.v3.ExternalProcessor"
    assert check.interval.ToMilliseconds() == 250
    assert check.no_traffic_interval == check.interval  # Envoy's default is 60 s
    assert check.timeout.ToMilliseconds() == 150
    assert (check.unhealthy_threshold.value, check.healthy_threshold.value) == (2, 1)


def test_with_no_healthy_replica_envoy_fails_the_stream_instead_of_panicking() -> None:
    lb = ext_proc_cluster(EdgeSettings()).common_lb_config
    assert lb.HasField("healthy_panic_threshold")
    assert lb.healthy_panic_threshold.value == 0


def test_replicas_are_reached_over_mutual_tls_and_must_be_ext_proc_certificates() -> None:
    """The node's own certificate and the fleet's CA come from its bootstrap's static secrets
    (named, with no SDS source; a node with a secrets directory is served its SDS files
    instead: test_xds_node.py); a replica must present an ext_proc SPIFFE id: another role's
    certificate of the same CA (an edge's, say) cannot stand in for ext_proc."""
    socket = ext_proc_cluster(EdgeSettings()).transport_socket
    context = tls_pb2.UpstreamTlsContext()
    assert socket.typed_config.Unpack(context)
    common = context.common_tls_context
    [own] = common.tls_certificate_sds_secret_configs
    assert (own.name, own.HasField("sds_config")) == ("gpu-router.edge-certificate", False)
    validation = common.combined_validation_context
    assert validation.validation_context_sds_secret_config.name == "gpu-router.fleet-ca"
    assert not validation.validation_context_sds_secret_config.HasField("sds_config")
    [san] = validation.default_validation_context.match_typed_subject_alt_names
    assert (san.san_type, san.matcher.prefix) == (
        common_pb2.SubjectAltNameMatcher.URI, "spiffe://gpu-router/ext-proc/")
    assert list(common.alpn_protocols) == ["h2"]
    assert not validation.default_validation_context.HasField("crl")  # nothing revoked


def test_the_fleets_crl_rides_with_the_cluster_checked_on_the_replicas_leaf_only() -> None:
    """A revoked replica's certificate fails every edge's handshake with the next config; the
    CA is the trust anchor, so only the leaf is looked up (no CRL for the CA itself)."""
    crl = b"-----BEGIN X509 CRL-----\n...\n-----END X509 CRL-----\n"
    socket = ext_proc_cluster(EdgeSettings(ext_proc_crl=crl)).transport_socket
    context = tls_pb2.UpstreamTlsContext()
    assert socket.typed_config.Unpack(context)
    default = context.common_tls_context.combined_validation_context.default_validation_context
    assert (default.crl.inline_bytes, default.only_verify_leaf_cert_crl) == (crl, True)
    assert default.match_typed_subject_alt_names  # beside the SAN rule, not instead of it


def test_a_connection_takes_new_streams_for_a_bounded_age() -> None:
    """So a certificate the edge has replaced (and may see revoked) leaves its connections to
    the replicas within that age (edge_secret_files.CONNECTION_MAX_AGE_S)."""
    options = upstream_http_pb2.HttpProtocolOptions()
    cluster = ext_proc_cluster(EdgeSettings())
    assert cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(options)
    age = options.common_http_protocol_options.max_connection_duration
    assert age.ToSeconds() == CONNECTION_MAX_AGE_S == 30
