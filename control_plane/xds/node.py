"""Who is at the other end of a stream, and the one place a node is served differently.

Every node is served the same snapshot, except where its bootstrap asks otherwise in
node.metadata: {"gpu_router": {"edge_port": N}} moves that node's edge listener to port N,
so several Envoy nodes run on one machine. A type patched for a node is sent with the
version "<snapshot version>:<qualifier>": it changes whenever the snapshot's does, never
equals the unpatched one, and maps back to it for ACK tracking (`snapshot_version`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import MappingProxyType

from envoy.config.listener.v3 import listener_pb2
from google.protobuf import any_pb2, json_format, struct_pb2

from control_plane.translate import durable_log
from control_plane.translate.names import LISTENER, METADATA_NAMESPACE
from control_plane.xds import type_urls
from control_plane.xds.snapshot import TypeResources

EDGE_PORT_KEY = "edge_port"
_VERSION_SEPARATOR = ":"
"""Snapshot versions are hex content hashes, so the first separator starts the qualifier."""


class NodeMetadataError(ValueError):
    """A node's metadata asks for something that cannot be served (e.g. port 0)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    """Who is at the other end of the stream (the DiscoveryRequest's node)."""

    id: str
    cluster: str
    edge_port: int | None = None
    """Port of this node's edge listener; None: the snapshot's."""


def edge_port_from_metadata(metadata: struct_pb2.Struct) -> int | None:
    """node.metadata["gpu_router"]["edge_port"], or None when absent.

    Raises NodeMetadataError when present but not a port number.
    """
    ours = metadata.fields.get(METADATA_NAMESPACE)
    if ours is None:
        return None
    if ours.WhichOneof("kind") != "struct_value":
        raise NodeMetadataError(f"node metadata {METADATA_NAMESPACE!r} must be a struct")
    value = ours.struct_value.fields.get(EDGE_PORT_KEY)
    if value is None:
        return None
    number = value.number_value if value.WhichOneof("kind") == "number_value" else None
    if number is None or not number.is_integer() or not 0 < number < 65536:
        raise NodeMetadataError(
            f"node metadata {METADATA_NAMESPACE}.{EDGE_PORT_KEY} must be a port number "
            f"(1-65535), got {_shown(value)}"
        )
    return int(number)


def node_resources(node: Node | None, type_url: str, entry: TypeResources) -> TypeResources:
    """What `node` is served of one snapshot type: `entry` itself unless the node patches it
    (its edge port; its own durable request-log file, see translate/durable_log.py)."""
    if node is None or type_url != type_urls.LISTENER:
        return entry
    packed = entry.resources.get(LISTENER)
    if packed is None:
        return entry
    listener = listener_pb2.Listener()
    packed.Unpack(listener)
    qualifiers = []
    if node.edge_port is not None:
        listener.address.socket_address.port_value = node.edge_port
        qualifiers.append(str(node.edge_port))
    if durable_log.for_node(listener, node.id):
        qualifiers.append(node.id)
    if not qualifiers:
        return entry
    moved = any_pb2.Any()
    moved.Pack(listener, deterministic=True)
    return TypeResources(
        version=f"{entry.version}{_VERSION_SEPARATOR}{'/'.join(qualifiers)}",
        resources=MappingProxyType({**entry.resources, LISTENER: moved}),
    )


def snapshot_version(node_version: str) -> str:
    """The snapshot version a node-specific version was derived from (itself when unpatched)."""
    return node_version.split(_VERSION_SEPARATOR, 1)[0]


def _shown(value: struct_pb2.Value) -> str:
    return json.dumps(json_format.MessageToDict(value))
