"""The edge listener: strip client routing headers, read the body's routing fields into metadata,
ask ext_proc (headers and that metadata: one message per request), route; capture the usage the
response reports; log every request (its outcome and usage, "gpu-router.edge") and every attempt
on a provider ("gpu-router.attempt")."""

from __future__ import annotations

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    extension_pb2,
    grpc_service_pb2,
    substitution_format_string_pb2,
)
from envoy.config.core.v3.config_source_pb2 import ApiVersion
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    header_mutation_pb2 as early_mutation_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import wrappers_pb2

from control_plane.policy.model import RoutingConfig
from control_plane.telemetry.response_flags import FLAG_NAMES, UPSTREAM_FAILURE_FLAGS
from control_plane.translate.durable_log import (
    EXT_PROC_LATENCY,
    EXT_PROC_LATENCY_TAG,
    durable_edge_log,
)
from control_plane.translate.envoy_api import ads_source, milliseconds, packed, seconds, tls_socket
from control_plane.translate.names import (
    ACCESS_LOG_NAME,
    ATTEMPT_LOG_NAME,
    CLIENT_KEY_HEADERS,
    CLIENT_REQUEST_ID_HEADER,
    EDGE_LISTENER_SECRET,
    EXT_PROC_CLUSTER,
    EXT_PROC_FILTER,
    LISTENER,
    METADATA_NAMESPACE,
    MODEL_HEADER,
    REQUEST_METADATA_NAMESPACE,
    ROUTE_CONFIG,
    ROUTE_HEADER,
    STRATEGY_HEADER,
)
from control_plane.translate.request_fields import request_fields_lua
from control_plane.translate.settings import EdgeSettings
from control_plane.translate.usage_capture import usage_capture_lua

Mode = processing_mode_pb2.ProcessingMode

USAGE_CAPTURE_FILTER = "envoy.filters.http.lua"
REQUEST_FIELDS_FILTER = "gpu-router.request_fields"

DECISION_HEADERS = (":method", ":path", "content-length", MODEL_HEADER, STRATEGY_HEADER)
"""The request headers every decision reads (ext_proc/request.py)."""


def ext_proc_headers(config: RoutingConfig) -> tuple[str, ...]:
    """The request headers the edge sends ext_proc, which are the ones it reads: the decision's,
    the client key's when the policy declares clients, and every header a policy matches on.
    Any other header would only cost Envoy and ext_proc a copy and a parse per request (an
    OpenAI SDK sends a dozen), and a key nobody checks need not leave the edge."""
    names = set(DECISION_HEADERS)
    if config.clients:
        names.update(CLIENT_KEY_HEADERS)
    names.update(name for policy in config.policies for name, _ in policy.match.headers)
    return tuple(sorted(names))


def edge_listener(settings: EdgeSettings,
                  forwarded: tuple[str, ...] = DECISION_HEADERS) -> listener_pb2.Listener:
    """`forwarded`: the request headers ext_proc gets (ext_proc_headers)."""
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="edge",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=ROUTE_CONFIG),
        # Token streams may pause; only a stream silent this long is cut.
        stream_idle_timeout=seconds(settings.upstream_timeout_s),
        early_header_mutation_extensions=[_strip_route_header(), _edge_request_id()],
        # Envoy makes every request's x-request-id (the client's was moved aside just before).
        generate_request_id=wrappers_pb2.BoolValue(value=True),
        preserve_external_request_id=False,
        local_reply_config=_openai_local_replies(),
        http_filters=[
            *([_usage_capture()] if settings.capture_usage else []),
            _request_fields(),
            _ext_proc(settings, forwarded),
            _router(settings),
        ],
        access_log=[
            _access_log(settings),
            *([_stdout_log()] if settings.decision_log_stdout else []),
            *durable_edge_log(settings),
        ],
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
                ],
                transport_socket=_client_tls() if settings.edge_tls else None,
            )
        ],
    )


def _client_tls() -> base_pb2.TransportSocket:
    """TLS only, HTTP/1.1 or h2 by ALPN, with the certificate the control plane pushes over SDS
    (EDGE_LISTENER_SECRET): a rotated certificate is served without a restart, and a client
    that speaks plain HTTP gets its connection closed."""
    context = tls_pb2.DownstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(
            alpn_protocols=["h2", "http/1.1"],
            tls_certificate_sds_secret_configs=[
                secret_pb2.SdsSecretConfig(name=EDGE_LISTENER_SECRET, sds_config=ads_source())
            ],
        ),
    )
    return tls_socket(context)


def all_listeners(settings: EdgeSettings, forwarded: tuple[str, ...] = DECISION_HEADERS
                  ) -> dict[str, listener_pb2.Listener]:
    return {LISTENER: edge_listener(settings, forwarded)}


def _strip_route_header() -> extension_pb2.TypedExtensionConfig:
    """Only ext_proc may choose the providers: a client-sent route header is dropped before any
    route is matched. (A header_mutation HTTP filter is too late: Envoy 1.40 has already matched
    and cached the route by then, so when ext_proc fails open the client's header would pick the
    route.)"""
    mutation = early_mutation_pb2.HeaderMutation(
        mutations=[mutation_rules_pb2.HeaderMutation(remove=ROUTE_HEADER)]
    )
    return extension_pb2.TypedExtensionConfig(
        name="envoy.http.early_header_mutation.header_mutation", typed_config=packed(mutation)
    )


def _edge_request_id() -> extension_pb2.TypedExtensionConfig:
    """The ledger and audit ids are the edge's own: the client's x-request-id is moved to
    CLIENT_REQUEST_ID_HEADER (which the request-fields filter logs) and removed, so Envoy
    generates a fresh one for every request, whatever internal_address_config deems internal.
    Early mutations run before Envoy's request-id handling; a client-sent copy header goes first,
    so an absent x-request-id leaves none."""
    copy = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=CLIENT_REQUEST_ID_HEADER, value="%REQ(x-request-id)%"),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
    mutation = early_mutation_pb2.HeaderMutation(
        mutations=[
            mutation_rules_pb2.HeaderMutation(remove=CLIENT_REQUEST_ID_HEADER),
            mutation_rules_pb2.HeaderMutation(append=copy),
            mutation_rules_pb2.HeaderMutation(remove="x-request-id"),
        ]
    )
    return extension_pb2.TypedExtensionConfig(
        name="envoy.http.early_header_mutation.header_mutation", typed_config=packed(mutation)
    )


LOCAL_REPLY_BODY = {
    "error": {
        "message": "%LOCAL_REPLY_BODY%",
        "type": "upstream_error",
        "param": None,
        "code": "%RESPONSE_CODE_DETAILS%",
    }
}
"""Envoy's own error replies (no healthy provider, every attempt reset or timed out, overflow,
a body over the buffer limit), as the OpenAI-style JSON every SDK parses."""


def _openai_local_replies() -> hcm_pb2.LocalReplyConfig:
    """Envoy's own replies as OpenAI-style JSON instead of plain text. Only those Envoy makes up:
    any reply with a response flag (upstream failures, overflow, timeouts) and a 413; ext_proc's
    answers and the fallback routes' direct responses are JSON already and carry no flag."""
    body = substitution_format_string_pb2.SubstitutionFormatString()
    body.json_format.update(LOCAL_REPLY_BODY)
    any_flag = accesslog_pb2.AccessLogFilter(
        response_flag_filter=accesslog_pb2.ResponseFlagFilter()
    )
    too_large = accesslog_pb2.AccessLogFilter(
        status_code_filter=accesslog_pb2.StatusCodeFilter(
            comparison=accesslog_pb2.ComparisonFilter(
                op=accesslog_pb2.ComparisonFilter.EQ,
                value=base_pb2.RuntimeUInt32(
                    default_value=413, runtime_key="gpu_router.local_reply.json_status"
                ),
            )
        )
    )
    return hcm_pb2.LocalReplyConfig(
        mappers=[
            hcm_pb2.ResponseMapper(filter=f, body_format_override=body)
            for f in (any_flag, too_large)
        ]
    )


def _usage_capture() -> hcm_pb2.HttpFilter:
    """First in the chain, so last on the response path: it reads the response exactly as the
    client gets it (after any retry, local reply or filter edit) and writes its usage text into
    the edge request's dynamic metadata, which the edge access log carries."""
    lua = lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=usage_capture_lua()))
    return hcm_pb2.HttpFilter(name=USAGE_CAPTURE_FILTER, typed_config=packed(lua))


def _request_fields() -> hcm_pb2.HttpFilter:
    """The body fields ext_proc decides on, read by Envoy (the body never travels to ext_proc):
    the model string as sent, token limits, stream (see request_fields.py)."""
    lua = lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=request_fields_lua()))
    return hcm_pb2.HttpFilter(name=REQUEST_FIELDS_FILTER, typed_config=packed(lua))


def _ext_proc(settings: EdgeSettings, forwarded: tuple[str, ...]) -> hcm_pb2.HttpFilter:
    """Request headers only (`forwarded` of them), with the request fields' metadata attached:
    one message, one answer per request; when ext_proc is down or slow the request goes on to
    the fallback route, or with clients declared (fail closed) is answered 503, or 504 once the
    longer message timeout passes (EdgeSettings.ext_proc_closed_message_timeout_ms)."""
    processor = ext_proc_pb2.ExternalProcessor(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=EXT_PROC_CLUSTER)
        ),
        processing_mode=Mode(
            request_header_mode=Mode.SEND,
            response_header_mode=Mode.SKIP,
            request_body_mode=Mode.NONE,
            response_body_mode=Mode.NONE,
            request_trailer_mode=Mode.SKIP,
            response_trailer_mode=Mode.SKIP,
        ),
        allow_mode_override=False,
        forward_rules=ext_proc_pb2.HeaderForwardingRules(
            allowed_headers=string_pb2.ListStringMatcher(patterns=[
                string_pb2.StringMatcher(exact=name, ignore_case=True) for name in forwarded])),
        failure_mode_allow=settings.ext_proc_fail_open,
        status_on_error=None if settings.ext_proc_fail_open else http_status_pb2.HttpStatus(
            code=http_status_pb2.ServiceUnavailable),
        message_timeout=milliseconds(
            settings.ext_proc_message_timeout_ms if settings.ext_proc_fail_open
            else settings.ext_proc_closed_message_timeout_ms),
        metadata_options=ext_proc_pb2.MetadataOptions(
            forwarding_namespaces=ext_proc_pb2.MetadataOptions.MetadataNamespaces(
                untyped=[REQUEST_METADATA_NAMESPACE]
            ),
            # Envoy drops dynamic metadata from ext_proc unless its namespace is listed here.
            receiving_namespaces=ext_proc_pb2.MetadataOptions.MetadataNamespaces(
                untyped=[METADATA_NAMESPACE]
            ),
        ),
    )
    return hcm_pb2.HttpFilter(name=EXT_PROC_FILTER, typed_config=packed(processor))


FAILED_ATTEMPT_FLAGS = tuple(FLAG_NAMES[name] for name in UPSTREAM_FAILURE_FLAGS)
"""The response flags that blame a provider (telemetry/samples.py UPSTREAM_FAILURE_FLAGS, by
their short names): an attempt with one of them, or with a status of 400 or more, is a failed
attempt."""


def failed_attempts_only() -> accesslog_pb2.AccessLogFilter:
    """Only failed attempts go to the attempt log: the attempt that served a request is
    described by the request's own edge entry (its cluster, status and upstream timings), from
    which the control plane takes that health sample (samples.served_sample)."""
    return accesslog_pb2.AccessLogFilter(
        or_filter=accesslog_pb2.OrFilter(filters=[
            accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(
                comparison=accesslog_pb2.ComparisonFilter(
                    op=accesslog_pb2.ComparisonFilter.GE,
                    value=base_pb2.RuntimeUInt32(
                        default_value=400, runtime_key="gpu_router.attempt_log.min_status"),
                ))),
            accesslog_pb2.AccessLogFilter(response_flag_filter=accesslog_pb2.ResponseFlagFilter(
                flags=list(FAILED_ATTEMPT_FLAGS))),
        ])
    )


def _router(settings: EdgeSettings) -> hcm_pb2.HttpFilter:
    """The upstream log has one entry per failed attempt (upstream_cluster, status, flags,
    timings and a 429's Retry-After): the health samples of providers a request failed over
    from, or that failed it."""
    attempt_log = _grpc_log(
        settings,
        ATTEMPT_LOG_NAME,
        als_pb2.HttpGrpcAccessLogConfig(additional_response_headers_to_log=["retry-after"]),
    )
    attempt_log.filter.CopyFrom(failed_attempts_only())
    return hcm_pb2.HttpFilter(
        name="envoy.filters.http.router",
        typed_config=packed(router_pb2.Router(upstream_log=[attempt_log])),
    )


def _access_log(settings: EdgeSettings) -> accesslog_pb2.AccessLog:
    """One entry per client request, with every dynamic-metadata namespace (ext_proc's decision,
    the body fields, the captured usage) in common_properties.metadata. ext_proc's latency as
    its filter measured it (Envoy has no stat that times ext_proc) goes along as the custom tag
    EXT_PROC_LATENCY_TAG: the one field, rendered as text. The whole filter state
    (filter_state_objects_to_log, a Struct of every ext_proc stat) cost the control plane
    15-18 us of CPU per request to unpack, and the edge 31 us on average over three A/Bs of two
    stacks loaded in turn (-86, +21, -29 us: within the edge's noise)."""
    config = als_pb2.HttpGrpcAccessLogConfig()
    config.common_config.custom_tags.add(tag=EXT_PROC_LATENCY_TAG, value=EXT_PROC_LATENCY)
    return _grpc_log(settings, ACCESS_LOG_NAME, config)


DECISION_LOG_FIELDS = {
    "start_time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "client_request_id": f"%DYNAMIC_METADATA({REQUEST_METADATA_NAMESPACE}:client_request_id)%",
    "path": "%REQ(:PATH)%",
    "status": "%RESPONSE_CODE%",
    "duration_ms": "%DURATION%",
    "served_by": "%UPSTREAM_CLUSTER%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "flags": "%RESPONSE_FLAGS%",
    **{key: f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{key})%"
       for key in ("model", "policy", "strategy", "provider", "reason", "fallbacks", "candidates")},
}
"""What an operator reading Envoy's own log sees per request: ext_proc's decision (from its
dynamic metadata) next to what happened."""


def _stdout_log() -> accesslog_pb2.AccessLog:
    """The same decisions, one JSON line per request on Envoy's stdout."""
    log_format = substitution_format_string_pb2.SubstitutionFormatString(omit_empty_values=True)
    log_format.json_format.update(DECISION_LOG_FIELDS)
    config = stream_pb2.StdoutAccessLog(log_format=log_format)
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.stdout", typed_config=packed(config)
    )


def _grpc_log(
    settings: EdgeSettings, log_name: str, config: als_pb2.HttpGrpcAccessLogConfig
) -> accesslog_pb2.AccessLog:
    """`config` sent as `log_name` over gRPC ALS to the control plane (the bootstrap's xDS
    cluster), batched for at most access_log_flush_ms."""
    common = config.common_config
    common.log_name = log_name
    common.grpc_service.envoy_grpc.cluster_name = settings.xds_cluster
    common.transport_api_version = ApiVersion.V3
    common.buffer_flush_interval.CopyFrom(milliseconds(settings.access_log_flush_ms))
    common.buffer_size_bytes.value = settings.access_log_buffer_bytes
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.http_grpc", typed_config=packed(config)
    )
