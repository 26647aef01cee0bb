"""Provider clusters (and the ext_proc cluster): Envoy's own fault machinery, configured per provider.

Health checks, outlier detection and circuit breakers live here, in Envoy, not in Python, with
the policy's settings. Upstream HTTP filters run once per attempt on the routed
cluster: that is where the request is fitted to the provider (path prefix, its own model id: see
upstream_lua.py) and its API key is injected, from an SDS secret, so the key never passes through
ext_proc, logs or /config_dump.

Provider clusters keep Envoy's default healthy_panic_threshold (50%): with 0, an attempt on a
provider whose only endpoint is ejected ends in a local 503 "no healthy upstream" that the retry
policy does not retry (seen with Envoy 1.40), so one ejected provider in a ranked order would end
the request instead of passing it to the next. ext_proc leaves ejected providers out of its orders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Set as AbstractSet

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import (
    base_pb2,
    extension_pb2,
    health_check_pb2,
    protocol_pb2,
)
from envoy.extensions.filters.http.credential_injector.v3 import credential_injector_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.injected_credentials.generic.v3 import generic_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as upstream_http_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import wrappers_pb2

from control_plane.policy.model import (
    Credential,
    HealthCheck,
    OutlierDetection,
    Provider,
    RoutingConfig,
)
from control_plane.translate.edge_secret_files import CONNECTION_MAX_AGE_S
from control_plane.translate.endpoints import (
    assignment,
    ip_address,
    lb_endpoint,
    load_assignment,
    uses_eds,
)
from control_plane.translate.envoy_api import (
    ads_source,
    milliseconds,
    packed,
    provider_metadata,
    seconds,
    tls_socket,
)
from control_plane.translate.names import (
    EDGE_CERTIFICATE_SECRET,
    EXT_PROC_CLUSTER,
    FLEET_CA_SECRET,
    credential_secret,
)
from control_plane.translate.provider_cap import (
    CONNECTION_OPTIONS,
    ONE_STREAM_H2,
    circuit_breakers,
    fleet_concurrency,
    retries_in_flight,
)
from control_plane.translate.settings import EdgeSettings
from control_plane.translate.upstream_lua import credential_headers, model_aliases, provider_lua
from gpu_router.pki import Role, role_prefix

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ENFORCED = wrappers_pb2.UInt32Value(value=100)
"""Outlier-detection enforcement: every detected outlier is ejected."""


def watchful(detection: OutlierDetection) -> OutlierDetection:
    """The outlier detection of a provider the fleet found degraded or ejected: every Envoy ejects
    an endpoint of it on its first failure of any kind, instead of waiting for a run of them."""
    return dataclasses.replace(
        detection,
        consecutive_5xx=1,
        consecutive_gateway_failure=1,
        consecutive_local_origin_failure=1,
    )


def provider_cluster(
    provider: Provider,
    settings: EdgeSettings,
    *,
    lua_source: str,
    max_retries: int,
    max_waiting: int,
    watched: bool = False,
) -> cluster_pb2.Cluster:
    """`lua_source` is the provider's per-attempt rewrite (upstream_lua.provider_lua);
    `max_retries` caps the retries in flight of requests first sent here, `max_waiting` the
    requests waiting for one of its connections (provider_cap.py);
    `watched` tightens its outlier detection (see watchful)."""
    detection = watchful(provider.outlier_detection) if watched else provider.outlier_detection
    cluster = cluster_pb2.Cluster(
        name=provider.name,
        connect_timeout=seconds(5),
        per_connection_buffer_limit_bytes=wrappers_pb2.UInt32Value(
            value=settings.buffer_limit_bytes
        ),
        metadata=provider_metadata(provider.name),
        health_checks=[
            _health_check(provider.upstream.host, provider.health_check_path, provider.health_check)
        ],
        circuit_breakers=circuit_breakers(provider.max_concurrency, max_retries, max_waiting),
        outlier_detection=_outlier_detection(detection),
    )
    if uses_eds(provider):
        cluster.type = cluster_pb2.Cluster.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(ads_source())
    else:
        cluster.type = cluster_pb2.Cluster.STRICT_DNS
        cluster.dns_lookup_family = cluster_pb2.Cluster.V4_PREFERRED
        cluster.load_assignment.CopyFrom(load_assignment(provider))
    tls = provider.upstream.scheme == "https"
    if tls:
        cluster.transport_socket.CopyFrom(
            _tls_socket(provider.upstream.host, settings.trusted_ca_file)
        )
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(
        packed(_protocol_options(provider, lua_source, tls=tls))
    )
    return cluster


EXT_PROC_HEALTH_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
"""The grpc.health.v1 service name each ext_proc worker reports on (ext_proc/serving_status.py)."""
EXT_PROC_CHECK_INTERVAL_MS = 250
EXT_PROC_CHECK_TIMEOUT_MS = 150
"""A live worker answers a health check in about a millisecond; 150 ms leaves room for a loaded
machine without letting a frozen one hold requests for long."""
EXT_PROC_UNHEALTHY_CHECKS = 2
"""Missed (timed-out) checks before a replica is marked unhealthy: one stall is forgiven, a
freeze is caught within 2 x (interval + timeout) = 800 ms. A NOT_SERVING answer marks it at once."""


def ext_proc_cluster(settings: EdgeSettings) -> cluster_pb2.Cluster:
    """The gRPC (HTTP/2) cluster of the ext_proc replicas.

    A replica that refuses or drops one connection is ejected at once (outlier detection), and
    one that is frozen, overloaded or has no policy yet is marked unhealthy by the gRPC health
    check. The panic threshold is 0: with no healthy replica Envoy fails the ext_proc stream at
    once ("no healthy upstream") and failure_mode_allow sends the request on the fallback route,
    instead of each request waiting out the message timeout on a replica that cannot answer.
    """
    options = upstream_http_pb2.HttpProtocolOptions(
        explicit_http_config=upstream_http_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        ),
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(
            max_connection_duration=seconds(CONNECTION_MAX_AGE_S)),  # a renewed certificate
    )
    replicas = settings.ext_proc_endpoints
    by_ip = all(ip_address(host) is not None for host, _ in replicas)
    cluster = cluster_pb2.Cluster(
        name=EXT_PROC_CLUSTER,
        type=cluster_pb2.Cluster.STATIC if by_ip else cluster_pb2.Cluster.STRICT_DNS,
        connect_timeout=seconds(1),
        per_connection_buffer_limit_bytes=wrappers_pb2.UInt32Value(
            value=settings.buffer_limit_bytes
        ),
        load_assignment=assignment(
            EXT_PROC_CLUSTER,
            [lb_endpoint(ip_address(host) or host, port) for host, port in replicas],
        ),
        outlier_detection=outlier_detection_pb2.OutlierDetection(
            split_external_local_origin_errors=True,
            consecutive_local_origin_failure=wrappers_pb2.UInt32Value(value=1),
            enforcing_consecutive_local_origin_failure=ENFORCED,
            interval=seconds(1),
            base_ejection_time=seconds(5),
            max_ejection_percent=wrappers_pb2.UInt32Value(value=100),
        ),
        health_checks=[_ext_proc_health_check()],
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
            healthy_panic_threshold=percent_pb2.Percent(value=0)
        ),
        transport_socket=_ext_proc_tls(settings.ext_proc_crl),
    )
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(packed(options))
    return cluster


def _ext_proc_tls(crl: bytes) -> base_pb2.TransportSocket:
    """Mutual TLS to the ext_proc replicas, which take nothing else: the node's own edge
    certificate, and a replica's checked against the fleet's CA and for an ext_proc SPIFFE id.
    Both are named here without a source, so Envoy looks them up in the node's bootstrap's
    static secrets; a node with a secrets directory is served them from its SDS files instead
    (edge_secret_files.py). Either way the control plane never holds an edge's key. With a `crl`
    (the fleet's, PEM), a revoked replica's certificate fails the handshake: the leaf's only
    (the CA is the trust anchor)."""
    context = tls_pb2.UpstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(
            alpn_protocols=["h2"],
            tls_certificate_sds_secret_configs=[
                secret_pb2.SdsSecretConfig(name=EDGE_CERTIFICATE_SECRET)
            ],
            combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
                default_validation_context=common_pb2.CertificateValidationContext(
                    match_typed_subject_alt_names=[common_pb2.SubjectAltNameMatcher(
                        san_type=common_pb2.SubjectAltNameMatcher.URI,
                        matcher=string_pb2.StringMatcher(prefix=role_prefix(Role.EXT_PROC)),
                    )],
                    crl=base_pb2.DataSource(inline_bytes=crl) if crl else None,
                    only_verify_leaf_cert_crl=bool(crl),
                ),
                validation_context_sds_secret_config=secret_pb2.SdsSecretConfig(
                    name=FLEET_CA_SECRET
                ),
            ),
        ),
    )
    return tls_socket(context)


def _ext_proc_health_check() -> health_check_pb2.HealthCheck:
    """grpc.health.v1 Check of the ExternalProcessor service, as often with traffic as without
    (no_traffic_interval defaults to 60 s); one good answer brings a replica back."""
    interval = milliseconds(EXT_PROC_CHECK_INTERVAL_MS)
    return health_check_pb2.HealthCheck(
        timeout=milliseconds(EXT_PROC_CHECK_TIMEOUT_MS),
        interval=interval,
        no_traffic_interval=interval,
        unhealthy_threshold=wrappers_pb2.UInt32Value(value=EXT_PROC_UNHEALTHY_CHECKS),
        healthy_threshold=wrappers_pb2.UInt32Value(value=1),
        grpc_health_check=health_check_pb2.HealthCheck.GrpcHealthCheck(
            service_name=EXT_PROC_HEALTH_SERVICE
        ),
    )


def all_clusters(
    config: RoutingConfig, settings: EdgeSettings, watched: AbstractSet[str] = frozenset()
) -> dict[str, cluster_pb2.Cluster]:
    """Every cluster Envoy needs over CDS, by name: providers in policy order, then ext_proc.
    Providers in `watched` (the fleet found them degraded or ejected) get watchful outlier
    detection."""
    strip_headers = credential_headers(config)
    aliases = model_aliases(config)
    max_retries, max_waiting = retries_in_flight(config), fleet_concurrency(config)
    clusters = {
        p.name: provider_cluster(
            p,
            settings,
            lua_source=provider_lua(p, aliases, strip_headers),
            max_retries=max_retries,
            max_waiting=max_waiting,
            watched=p.name in watched,
        )
        for p in config.providers
    }
    clusters[EXT_PROC_CLUSTER] = ext_proc_cluster(settings)
    return clusters


def _health_check(host: str, path: str, check: HealthCheck) -> health_check_pb2.HealthCheck:
    """HTTP GET `path`; a provider that has no traffic is checked as often as one that has."""
    interval = milliseconds(check.interval_ms)
    return health_check_pb2.HealthCheck(
        timeout=milliseconds(check.timeout_ms),
        interval=interval,
        no_traffic_interval=interval,
        unhealthy_threshold=wrappers_pb2.UInt32Value(value=check.unhealthy_threshold),
        healthy_threshold=wrappers_pb2.UInt32Value(value=check.healthy_threshold),
        http_health_check=health_check_pb2.HealthCheck.HttpHealthCheck(host=host, path=path),
    )


def _outlier_detection(detection: OutlierDetection) -> outlier_detection_pb2.OutlierDetection:
    """Every kind enforced (gateway, local-origin and failure-percentage enforcement default to
    0%), and a provider's only endpoint may be ejected (max_ejection_percent defaults to 10%).
    Local-origin failures (refused or reset connections, timeouts) are counted apart from the
    provider's own 5xx answers."""
    return outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=wrappers_pb2.UInt32Value(value=detection.consecutive_5xx),
        consecutive_gateway_failure=wrappers_pb2.UInt32Value(
            value=detection.consecutive_gateway_failure
        ),
        enforcing_consecutive_gateway_failure=ENFORCED,
        split_external_local_origin_errors=True,
        consecutive_local_origin_failure=wrappers_pb2.UInt32Value(
            value=detection.consecutive_local_origin_failure
        ),
        enforcing_consecutive_local_origin_failure=ENFORCED,
        failure_percentage_threshold=wrappers_pb2.UInt32Value(
            value=detection.failure_percentage_threshold
        ),
        failure_percentage_minimum_hosts=wrappers_pb2.UInt32Value(
            value=detection.failure_percentage_minimum_hosts
        ),
        failure_percentage_request_volume=wrappers_pb2.UInt32Value(
            value=detection.failure_percentage_request_volume
        ),
        enforcing_failure_percentage=ENFORCED,
        enforcing_failure_percentage_local_origin=ENFORCED,
        interval=milliseconds(detection.interval_ms),
        base_ejection_time=milliseconds(detection.base_ejection_time_ms),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=100),
    )


def _tls_socket(host: str, trusted_ca_file: str) -> base_pb2.TransportSocket:
    """TLS with ALPN h2/http1.1, the chain checked against the CA bundle and the name against
    the certificate (Envoy checks no name unless told). No SNI for IP literals (RFC 6066)."""
    address = ip_address(host)
    if address is None:
        san = common_pb2.SubjectAltNameMatcher(
            san_type=common_pb2.SubjectAltNameMatcher.DNS,
            matcher=string_pb2.StringMatcher(exact=host),
        )
    else:
        san = common_pb2.SubjectAltNameMatcher(
            san_type=common_pb2.SubjectAltNameMatcher.IP_ADDRESS,
            matcher=string_pb2.StringMatcher(exact=address),
        )
    context = tls_pb2.UpstreamTlsContext(
        sni=host if address is None else "",
        common_tls_context=tls_pb2.CommonTlsContext(
            alpn_protocols=["h2", "http/1.1"],
            validation_context=common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(filename=trusted_ca_file),
                match_typed_subject_alt_names=[san],
            ),
        ),
    )
    return tls_socket(context)


def _protocol_options(
    provider: Provider, lua_source: str, *, tls: bool
) -> upstream_http_pb2.HttpProtocolOptions:
    """HTTP/1.1 in clear; ALPN-negotiated h2 or HTTP/1.1 over TLS, one request a connection
    either way (provider_cap.py); then the per-attempt filters: the rewrite, the credential,
    the codec."""
    options = upstream_http_pb2.HttpProtocolOptions(
        common_http_protocol_options=CONNECTION_OPTIONS
    )
    if tls:
        options.auto_config.http_protocol_options.CopyFrom(protocol_pb2.Http1ProtocolOptions())
        options.auto_config.http2_protocol_options.CopyFrom(ONE_STREAM_H2)
    else:
        options.explicit_http_config.http_protocol_options.CopyFrom(
            protocol_pb2.Http1ProtocolOptions()
        )
    lua = lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=lua_source))
    options.http_filters.append(
        hcm_pb2.HttpFilter(name="envoy.filters.http.lua", typed_config=packed(lua))
    )
    if provider.credential is not None:
        options.http_filters.append(_credential_injector(provider.name, provider.credential))
    options.http_filters.append(
        hcm_pb2.HttpFilter(
            name="envoy.filters.http.upstream_codec",
            typed_config=packed(upstream_codec_pb2.UpstreamCodec()),
        )
    )
    return options


def _credential_injector(provider: str, credential: Credential) -> hcm_pb2.HttpFilter:
    """Writes the provider's key (SDS secret, value already prefixed, see secrets.py) into
    `credential.header`, replacing whatever the client sent there."""
    generic = generic_pb2.Generic(
        credential=secret_pb2.SdsSecretConfig(
            name=credential_secret(provider), sds_config=ads_source()
        ),
        header=credential.header,
    )
    injector = credential_injector_pb2.CredentialInjector(
        overwrite=True,
        credential=extension_pb2.TypedExtensionConfig(
            name="envoy.http.injected_credentials.generic", typed_config=packed(generic)
        ),
    )
    return hcm_pb2.HttpFilter(
        name="envoy.filters.http.credential_injector", typed_config=packed(injector)
    )
