"""The edge listener: strip client routing headers, ask ext_proc, route; log every request over gRPC."""

from __future__ import annotations

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import address_pb2, extension_pb2, grpc_service_pb2
from envoy.config.core.v3.config_source_pb2 import ApiVersion
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    header_mutation_pb2 as early_mutation_pb2,
)
from google.protobuf import wrappers_pb2

from control_plane.translate.envoy_api import ads_source, milliseconds, packed, seconds
from control_plane.translate.names import (
    ACCESS_LOG_NAME,
    CLUSTER_HEADER,
    EXT_PROC_CLUSTER,
    LISTENER,
    METADATA_NAMESPACE,
    MODEL_HEADER,
    ROUTE_CONFIG,
    STRATEGY_HEADER,
)
from control_plane.translate.settings import EdgeSettings

Mode = processing_mode_pb2.ProcessingMode


def edge_listener(settings: EdgeSettings) -> listener_pb2.Listener:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="edge",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=ROUTE_CONFIG),
        # Token streams may pause; only a stream silent this long is cut.
        stream_idle_timeout=seconds(settings.upstream_timeout_s),
        early_header_mutation_extensions=[_strip_cluster_header()],
        http_filters=[_ext_proc(settings), _router()],
        access_log=[_access_log(settings)],
    )
    return listener_pb2.Listener(
        name=LISTENER,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(
                address=settings.edge_host, port_value=settings.edge_port
            )
        ),
        per_connection_buffer_limit_bytes=wrappers_pb2.UInt32Value(
            value=settings.buffer_limit_bytes
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=packed(manager),
                    )
                ]
            )
        ],
    )


def all_listeners(settings: EdgeSettings) -> dict[str, listener_pb2.Listener]:
    return {LISTENER: edge_listener(settings)}


def _strip_cluster_header() -> extension_pb2.TypedExtensionConfig:
    """Only ext_proc may choose the cluster: a client-sent cluster header is dropped before any
    route is matched. (A header_mutation HTTP filter is too late: Envoy 1.40 has already matched
    and cached the route by then, so when ext_proc fails open the client's header would pick the
    cluster, internal ones included.)"""
    mutation = early_mutation_pb2.HeaderMutation(
        mutations=[mutation_rules_pb2.HeaderMutation(remove=CLUSTER_HEADER)]
    )
    return extension_pb2.TypedExtensionConfig(
        name="envoy.http.early_header_mutation.header_mutation", typed_config=packed(mutation)
    )


def _ext_proc(settings: EdgeSettings) -> hcm_pb2.HttpFilter:
    """Request headers always, the body buffered unless ext_proc waives it (mode override), no
    response phases; when ext_proc is down or slow the request goes on to the fallback route."""
    processor = ext_proc_pb2.ExternalProcessor(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
                cluster_name=EXT_PROC_CLUSTER,
                max_receive_message_length=wrappers_pb2.UInt32Value(
                    value=settings.ext_proc_max_message_bytes
                ),
            )
        ),
        processing_mode=Mode(
            request_header_mode=Mode.SEND,
            response_header_mode=Mode.SKIP,
            request_body_mode=Mode.BUFFERED,
            response_body_mode=Mode.NONE,
            request_trailer_mode=Mode.SKIP,
            response_trailer_mode=Mode.SKIP,
        ),
        allow_mode_override=True,
        failure_mode_allow=True,
        message_timeout=milliseconds(settings.ext_proc_message_timeout_ms),
        # Envoy drops dynamic metadata from ext_proc unless its namespace is listed here.
        metadata_options=ext_proc_pb2.MetadataOptions(
            receiving_namespaces=ext_proc_pb2.MetadataOptions.MetadataNamespaces(
                untyped=[METADATA_NAMESPACE]
            )
        ),
    )
    return hcm_pb2.HttpFilter(name="envoy.filters.http.ext_proc", typed_config=packed(processor))


def _router() -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(
        name="envoy.filters.http.router", typed_config=packed(router_pb2.Router())
    )


def _access_log(settings: EdgeSettings) -> accesslog_pb2.AccessLog:
    config = als_pb2.HttpGrpcAccessLogConfig(
        common_config=als_pb2.CommonGrpcAccessLogConfig(
            log_name=ACCESS_LOG_NAME,
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=settings.xds_cluster)
            ),
            transport_api_version=ApiVersion.V3,
            buffer_flush_interval=milliseconds(settings.access_log_flush_ms),
        ),
        additional_request_headers_to_log=[MODEL_HEADER, STRATEGY_HEADER, "x-request-id"],
    )
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.http_grpc", typed_config=packed(config)
    )
