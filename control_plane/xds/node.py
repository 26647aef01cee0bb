"""Who is at the other end of a stream, and the one place a node is served differently.

Every node is served the same snapshot, except where its bootstrap asks otherwise in
node.metadata: {"gpu_router": {"edge_port": N}} moves that node's edge listener to port N,
so several Envoy nodes run on one machine; {"gpu_router": {"secrets_dir": D}} has its ext_proc
cluster read the node's certificate and the fleet's CA from the SDS files in D, which it
watches (translate/edge_secret_files.py). A type patched for a node is sent with the
version "<snapshot version>:<qualifier>": it changes whenever the snapshot's does, never
equals the unpatched one, and maps back to it for ACK tracking (`snapshot_version`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import any_pb2, json_format, struct_pb2

from control_plane.translate import durable_log, edge_secret_files
from control_plane.translate.names import EXT_PROC_CLUSTER, LISTENER, METADATA_NAMESPACE
from control_plane.xds import type_urls
from control_plane.xds.snapshot import TypeResources

EDGE_PORT_KEY = "edge_port"
SECRETS_DIR_KEY = "secrets_dir"
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
    secrets_dir: str | None = None
    """Where the node's SDS files of its own certificate and the fleet's CA are; None: its
    bootstrap's static secrets."""


def _ours(metadata: struct_pb2.Struct, key: str) -> struct_pb2.Value | None:
    ours = metadata.fields.get(METADATA_NAMESPACE)
    if ours is None:
        return None
    if ours.WhichOneof("kind") != "struct_value":
        raise NodeMetadataError(f"node metadata {METADATA_NAMESPACE!r} must be a struct")
    return ours.struct_value.fields.get(key)


def secrets_dir_from_metadata(metadata: struct_pb2.Struct) -> str | None:
    """node.metadata["gpu_router"]["secrets_dir"], or None when absent.

    Raises NodeMetadataError when present but not an absolute path."""
    value = _ours(metadata, SECRETS_DIR_KEY)
    if value is None:
        return None
    path = value.string_value if value.WhichOneof("kind") == "string_value" else ""
    if not PurePosixPath(path).is_absolute() or not path.isprintable():
        raise NodeMetadataError(
            f"node metadata {METADATA_NAMESPACE}.{SECRETS_DIR_KEY} must be an absolute path, "
            f"got {_shown(value)}")
    return path


def edge_port_from_metadata(metadata: struct_pb2.Struct) -> int | None:
    """node.metadata["gpu_router"]["edge_port"], or None when absent.

    Raises NodeMetadataError when present but not a port number.
    """
    value = _ours(metadata, EDGE_PORT_KEY)
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
    (its edge port; its own durable request-log file, see translate/durable_log.py; its secrets
    directory)."""
    if node is not None and type_url == type_urls.CLUSTER and node.secrets_dir is not None:
        return _secrets_read_from(node.secrets_dir, entry)
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


def _secrets_read_from(directory: str, entry: TypeResources) -> TypeResources:
    packed = entry.resources.get(EXT_PROC_CLUSTER)
    if packed is None:
        return entry
    cluster = cluster_pb2.Cluster()
    packed.Unpack(cluster)
    if not edge_secret_files.read_from(cluster, directory):
        return entry
    patched = any_pb2.Any()
    patched.Pack(cluster, deterministic=True)
    qualifier = "sds-" + hashlib.sha256(directory.encode()).hexdigest()[:12]
    return TypeResources(
        version=f"{entry.version}{_VERSION_SEPARATOR}{qualifier}",
        resources=MappingProxyType({**entry.resources, EXT_PROC_CLUSTER: patched}),
    )


def snapshot_version(node_version: str) -> str:
    """The snapshot version a node-specific version was derived from (itself when unpatched)."""
    return node_version.split(_VERSION_SEPARATOR, 1)[0]


def _shown(value: struct_pb2.Value) -> str:
    return json.dumps(json_format.MessageToDict(value))
