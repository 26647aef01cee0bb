"""The edge listener: address, limits, header stripping, body fields to metadata, ext_proc
contract, access log."""

from __future__ import annotations

from typing import TypeVar

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
from google.protobuf.message import Message

from control_plane.policy.model import Client, Match, Policy, RoutingConfig
from control_plane.translate.listeners import (
    DECISION_HEADERS,
    all_listeners,
    edge_listener,
    ext_proc_headers,
)
from control_plane.translate.request_fields import request_fields_lua
from control_plane.translate.settings import EdgeSettings
from control_plane.translate.usage_capture import usage_capture_lua

SETTINGS = EdgeSettings(edge_host="127.0.0.2", edge_port=10123, xds_cluster="custom.xds")
Mode = processing_mode_pb2.ProcessingMode
M = TypeVar("M", bound=Message)


def connection_manager(settings: EdgeSettings = SETTINGS,
                       forwarded: tuple[str, ...] = DECISION_HEADERS
                       ) -> hcm_pb2.HttpConnectionManager:
    """The edge listener's HCM; `forwarded`: the headers it sends ext_proc."""
    listener = edge_listener(settings, forwarded)
    (chain,) = listener.filter_chains
    (network_filter,) = chain.filters
    assert network_filter.name == "envoy.filters.network.http_connection_manager"
    manager = hcm_pb2.HttpConnectionManager()
    assert network_filter.typed_config.Unpack(manager)
    return manager


def http_filter_config(name: str, config: M, forwarded: tuple[str, ...] = DECISION_HEADERS) -> M:
    (http_filter,) = [
        f for f in connection_manager(forwarded=forwarded).http_filters if f.name == name]
    assert http_filter.typed_config.Unpack(config)
    return config


def test_listener_name_address_and_buffer_limit() -> None:
    listener = edge_listener(SETTINGS)
    assert listener.name == "gpu-router.edge"
    assert list(all_listeners(SETTINGS)) == ["gpu-router.edge"]
    address = listener.address.socket_address
    assert (address.address, address.port_value) == ("127.0.0.2", 10123)
    assert listener.per_connection_buffer_limit_bytes.value == 32 * 1024 * 1024


def test_connection_manager_takes_routes_from_ads() -> None:
    manager = connection_manager()
    assert manager.stat_prefix == "edge"
    assert manager.codec_type == hcm_pb2.HttpConnectionManager.AUTO
    assert manager.rds.route_config_name == "gpu-router.routes"
    assert manager.rds.config_source.HasField("ads")
    assert manager.stream_idle_timeout.seconds == SETTINGS.upstream_timeout_s
    assert [f.name for f in manager.http_filters] == [
        "envoy.filters.http.lua",
        "gpu-router.request_fields",
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]


def test_client_route_header_is_removed_before_routing() -> None:
    extension, _ = connection_manager().early_header_mutation_extensions
    mutation = early_mutation_pb2.HeaderMutation()
    assert extension.typed_config.Unpack(mutation)
    assert [m.remove for m in mutation.mutations] == ["x-gpu-router-route"]


def test_the_clients_request_id_is_moved_aside_before_envoy_makes_the_edges() -> None:
    """What Envoy does with it is in test_translate_envoy.py (a client's id never reaches a
    provider or the log's request id)."""
    manager = connection_manager()
    _, extension = manager.early_header_mutation_extensions
    mutation = early_mutation_pb2.HeaderMutation()
    assert extension.typed_config.Unpack(mutation)
    steps = [(m.WhichOneof("action"), m.remove or m.append.header.key) for m in mutation.mutations]
    assert steps == [
        ("remove", "x-gpu-router-client-request-id"),
        ("append", "x-gpu-router-client-request-id"),
        ("remove", "x-request-id"),
    ]
    assert mutation.mutations[1].append.header.value == "%REQ(x-request-id)%"
    assert manager.generate_request_id.value
    assert not manager.preserve_external_request_id


def test_body_fields_are_read_by_the_request_fields_lua() -> None:
    lua = http_filter_config("gpu-router.request_fields", lua_pb2.Lua())
    assert lua.default_source_code.inline_string == request_fields_lua()


def test_usage_capture_runs_on_responses_only_and_writes_its_own_namespace() -> None:
    """First filter, so it reads the response after every other filter (the client's bytes)."""
    lua = http_filter_config("envoy.filters.http.lua", lua_pb2.Lua())
    source = lua.default_source_code.inline_string
    assert source == usage_capture_lua()
    assert 'local NAMESPACE = "gpu_router.usage"\nlocal TEXT_KEY = "text"\n' in source
    assert "local LIMIT = 4096\n" in source
    assert "function envoy_on_response(" in source
    assert "envoy_on_request" not in source
    assert ":body()" not in source


def test_ext_proc_gets_request_headers_and_body_metadata_only() -> None:
    config = http_filter_config("envoy.filters.http.ext_proc", ext_proc_pb2.ExternalProcessor())
    assert config.grpc_service.envoy_grpc.cluster_name == "gpu-router.ext_proc"
    mode = config.processing_mode
    assert (mode.request_header_mode, mode.response_header_mode) == (Mode.SEND, Mode.SKIP)
    assert (mode.request_body_mode, mode.response_body_mode) == (Mode.NONE, Mode.NONE)
    assert (mode.request_trailer_mode, mode.response_trailer_mode) == (Mode.SKIP, Mode.SKIP)
    assert not config.allow_mode_override
    assert config.failure_mode_allow
    assert config.message_timeout.ToMilliseconds() == 200
    options = config.metadata_options
    assert list(options.forwarding_namespaces.untyped) == ["gpu_router.request"]
    assert list(options.receiving_namespaces.untyped) == ["gpu_router"]
    assert forwarded(config) == [
        ":method", ":path", "content-length", "x-gpu-router-model", "x-gpu-router-strategy"]


def forwarded(config: ext_proc_pb2.ExternalProcessor) -> list[str]:
    """The request headers the ext_proc filter forwards (exact names, any case)."""
    patterns = config.forward_rules.allowed_headers.patterns
    assert all(p.ignore_case and p.WhichOneof("match_pattern") == "exact" for p in patterns)
    assert not config.forward_rules.HasField("disallowed_headers")
    return [p.exact for p in patterns]


def test_ext_proc_gets_the_client_key_and_policy_match_headers_only_when_they_are_read() -> None:
    policies = (Policy(name="batch", match=Match(headers=(("x-workload", "batch"),))),
                Policy(name="gold", match=Match(headers=(("x-tier", "gold"),
                                                         ("x-workload", "online")))),
                Policy(name="default"))
    plain = RoutingConfig(providers=(), models=(), policies=policies)
    assert ext_proc_headers(plain) == (
        ":method", ":path", "content-length", "x-gpu-router-model", "x-gpu-router-strategy",
        "x-tier", "x-workload")
    keyed = RoutingConfig(providers=(), models=(), policies=(Policy(name="default"),),
                          clients=(Client(name="team-a", key_sha256="0" * 64),))
    assert ext_proc_headers(keyed) == (
        ":method", ":path", "authorization", "content-length", "x-api-key",
        "x-gpu-router-model", "x-gpu-router-strategy")
    config = http_filter_config("envoy.filters.http.ext_proc", ext_proc_pb2.ExternalProcessor(),
                                ext_proc_headers(keyed))
    assert forwarded(config) == list(ext_proc_headers(keyed))


def test_access_log_goes_over_grpc_to_the_xds_cluster() -> None:
    (access_log,) = connection_manager().access_log
    assert access_log.name == "envoy.access_loggers.http_grpc"
    config = als_pb2.HttpGrpcAccessLogConfig()
    assert access_log.typed_config.Unpack(config)
    common = config.common_config
    assert common.log_name == "gpu-router.edge"
    assert common.grpc_service.envoy_grpc.cluster_name == "custom.xds"
    assert common.buffer_flush_interval.ToMilliseconds() == 100
    assert common.buffer_size_bytes.value == 256 * 1024
    assert not config.additional_request_headers_to_log  # the control plane reads none
    assert not common.filter_state_objects_to_log  # ext_proc's latency field alone, as a tag:
    assert [(tag.tag, tag.value) for tag in common.custom_tags] == [(
        "ext_proc_us",
        "%FILTER_STATE(envoy.filters.http.ext_proc:FIELD:request_header_latency_us)%")]


def test_failed_attempts_are_logged_over_grpc_with_their_retry_after() -> None:
    router = http_filter_config("envoy.filters.http.router", router_pb2.Router())
    (upstream_log,) = router.upstream_log
    assert upstream_log.name == "envoy.access_loggers.http_grpc"
    config = als_pb2.HttpGrpcAccessLogConfig()
    assert upstream_log.typed_config.Unpack(config)
    common = config.common_config
    assert common.log_name == "gpu-router.attempt"
    assert common.grpc_service.envoy_grpc.cluster_name == "custom.xds"
    assert common.buffer_flush_interval.ToMilliseconds() == 100
    assert list(config.additional_response_headers_to_log) == ["retry-after"]
    status, flags = upstream_log.filter.or_filter.filters
    assert status.status_code_filter.comparison.value.default_value == 400
    assert "UF" in flags.response_flag_filter.flags and "UT" in flags.response_flag_filter.flags


def test_usage_capture_is_left_out_when_accounting_is_off() -> None:
    names = [f.name for f in connection_manager(EdgeSettings(capture_usage=False)).http_filters]

    assert "envoy.filters.http.lua" not in names
    assert names[0] == "gpu-router.request_fields"


def test_decisions_are_logged_on_envoys_stdout_as_json_when_asked() -> None:
    assert not [log for log in connection_manager().access_log
                if log.name == "envoy.access_loggers.stdout"]
    (stdout,) = [log for log in connection_manager(EdgeSettings(decision_log_stdout=True)).access_log
                 if log.name == "envoy.access_loggers.stdout"]
    config = stream_pb2.StdoutAccessLog()
    assert stdout.typed_config.Unpack(config)
    fields = dict(config.log_format.json_format)
    assert fields["reason"] == "%DYNAMIC_METADATA(gpu_router:reason)%"
    assert fields["served_by"] == "%UPSTREAM_CLUSTER%"


def test_the_forwarded_headers_are_the_ones_ext_proc_reads() -> None:
    """The wire contract between the deployables (a test may import both): ext_proc's routing
    headers are among the decision's, and it finds a client key in each client-key header."""
    from control_plane.translate.names import CLIENT_KEY_HEADERS
    from ext_proc.clients import presented_key
    from ext_proc.request import MODEL_HEADER, STRATEGY_HEADER

    assert {MODEL_HEADER, STRATEGY_HEADER} < set(DECISION_HEADERS)
    for name in CLIENT_KEY_HEADERS:
        value = b"Bearer sk-1" if name == "authorization" else b"sk-1"
        assert presented_key([(name, value)]) == b"sk-1", name
