"""The edge's durable request log: in the listener only when configured, one file per node."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2

from control_plane.translate.durable_log import FILE_LOGGER, log_file
from control_plane.translate.listeners import edge_listener
from control_plane.translate.names import LISTENER
from control_plane.translate.settings import EdgeSettings
from control_plane.xds import type_urls
from control_plane.xds.node import Node, node_resources, snapshot_version
from control_plane.xds.snapshot import TypeResources


def listeners(settings: EdgeSettings) -> TypeResources:
    packed = any_pb2.Any()
    packed.Pack(edge_listener(settings), deterministic=True)
    return TypeResources(version="v1", resources=MappingProxyType({LISTENER: packed}))


def file_paths(entry: TypeResources) -> list[str]:
    listener = listener_pb2.Listener()
    entry.resources[LISTENER].Unpack(listener)
    manager = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    paths = []
    for access_log in manager.access_log:
        if access_log.name == FILE_LOGGER:
            config = file_pb2.FileAccessLog()
            access_log.typed_config.Unpack(config)
            paths.append(config.path)
    return paths


def test_no_file_log_unless_a_directory_is_set() -> None:
    entry = listeners(EdgeSettings())
    assert file_paths(entry) == []
    assert node_resources(Node(id="edge-1", cluster="c"), type_urls.LISTENER, entry) is entry


def test_each_node_is_served_its_own_file(tmp_path: Path) -> None:
    entry = listeners(EdgeSettings(edge_log_dir=str(tmp_path)))
    first = node_resources(Node(id="edge-1", cluster="c"), type_urls.LISTENER, entry)
    second = node_resources(Node(id="edge-2", cluster="c", edge_port=10001),
                            type_urls.LISTENER, entry)

    assert file_paths(first) == [str(tmp_path / "edge-1.access.jsonl")]
    assert file_paths(second) == [str(tmp_path / "edge-2.access.jsonl")]
    assert first.version != second.version
    assert snapshot_version(first.version) == snapshot_version(second.version) == "v1"


def test_a_node_id_is_made_safe_for_a_file_name(tmp_path: Path) -> None:
    assert log_file(tmp_path, "../edge 1") == tmp_path / ".._edge_1.access.jsonl"
