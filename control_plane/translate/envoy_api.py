"""Envoy API idioms every translator repeats: packing into Any, the ADS config source, metadata."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2, config_source_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.protobuf.message import Message

from control_plane.translate.names import METADATA_NAMESPACE


def tls_socket(context: Message) -> base_pb2.TransportSocket:
    """Envoy's TLS transport socket around an Upstream- or DownstreamTlsContext."""
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=packed(context))


def packed(message: Message) -> any_pb2.Any:
    """`message` as a typed_config Any (type URL prefix type.googleapis.com/)."""
    wrapped = any_pb2.Any()
    wrapped.Pack(message, deterministic=True)
    return wrapped


def ads_source() -> config_source_pb2.ConfigSource:
    """Fetch over the node's ADS stream (v3), as every dynamic resource here is."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def provider_metadata(provider: str) -> base_pb2.Metadata:
    """filter_metadata {"gpu_router": {"provider": name}} for clusters and endpoints."""
    fields = struct_pb2.Struct()
    fields.update({"provider": provider})
    return base_pb2.Metadata(filter_metadata={METADATA_NAMESPACE: fields})


def milliseconds(value: int) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(value)
    return duration


def seconds(value: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=value)
