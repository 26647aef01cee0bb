"""Per-node views: node metadata moves one node's edge listener, with a version of its own."""

from __future__ import annotations

import pytest
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import any_pb2, json_format, struct_pb2
from xds_fixtures import cluster, listener

from control_plane.xds import type_urls
from control_plane.xds.node import (
    Node,
    NodeMetadataError,
    edge_port_from_metadata,
    node_resources,
    snapshot_version,
)
from control_plane.xds.snapshot import TypeResources

EDGE_LISTENER = "gpu-router.edge"


def metadata(document: dict) -> struct_pb2.Struct:
    return json_format.ParseDict(document, struct_pb2.Struct())


def listeners(port: int = 10000, **extra: listener_pb2.Listener) -> TypeResources:
    return TypeResources.of(
        {EDGE_LISTENER: listener(EDGE_LISTENER, port, "gpu-router.routes"), **extra}
    )


def port_of(packed: any_pb2.Any) -> int:
    decoded = listener_pb2.Listener()
    packed.Unpack(decoded)
    return decoded.address.socket_address.port_value


def edge(port: int | None) -> Node:
    return Node(id="edge-2", cluster="gpu-router-edge", edge_port=port)


@pytest.mark.parametrize(
    ("document", "port"),
    [
        ({}, None),
        ({"other": {"edge_port": 1}}, None),
        ({"gpu_router": {}}, None),
        ({"gpu_router": {"edge_port": 10001}}, 10001),
        ({"gpu_router": {"edge_port": 10001.0, "zone": "a"}}, 10001),
    ],
)
def test_edge_port_is_read_from_our_namespace(document: dict, port: int | None) -> None:
    assert edge_port_from_metadata(metadata(document)) == port


@pytest.mark.parametrize(
    ("document", "shown"),
    [
        ({"gpu_router": "edge_port=1"}, "must be a struct"),
        ({"gpu_router": {"edge_port": "10001"}}, 'got "10001"'),
        ({"gpu_router": {"edge_port": 0}}, "got 0"),
        ({"gpu_router": {"edge_port": 65536}}, "got 65536"),
        ({"gpu_router": {"edge_port": 80.5}}, "got 80.5"),
        ({"gpu_router": {"edge_port": None}}, "got null"),
    ],
)
def test_an_unusable_edge_port_is_refused_with_what_was_given(document: dict, shown: str) -> None:
    with pytest.raises(NodeMetadataError, match=shown):
        edge_port_from_metadata(metadata(document))


def test_a_node_without_an_edge_port_gets_the_snapshot_entry_itself() -> None:
    entry = listeners()
    assert node_resources(edge(None), type_urls.LISTENER, entry) is entry
    assert node_resources(None, type_urls.LISTENER, entry) is entry


def test_only_the_edge_listener_moves_and_the_version_says_so() -> None:
    other = listener("admin-extra", 9999, "gpu-router.routes")
    entry = listeners(10000, **{"admin-extra": other})
    view = node_resources(edge(10001), type_urls.LISTENER, entry)
    assert port_of(view.resources[EDGE_LISTENER]) == 10001
    assert view.resources["admin-extra"] == entry.resources["admin-extra"]
    assert port_of(entry.resources[EDGE_LISTENER]) == 10000, "the shared snapshot is untouched"
    assert view.version == f"{entry.version}:10001" != entry.version
    assert snapshot_version(view.version) == entry.version


def test_the_node_version_follows_the_snapshot_version() -> None:
    before = node_resources(edge(10001), type_urls.LISTENER, listeners(10000))
    after = node_resources(edge(10001), type_urls.LISTENER, listeners(10500))
    assert before.version != after.version
    assert port_of(before.resources[EDGE_LISTENER]) == port_of(after.resources[EDGE_LISTENER])


def test_the_same_port_as_the_snapshot_is_still_a_node_version() -> None:
    entry = listeners(10000)
    view = node_resources(edge(10000), type_urls.LISTENER, entry)
    assert view.version == f"{entry.version}:10000"
    assert view.resources[EDGE_LISTENER] == entry.resources[EDGE_LISTENER]


def test_other_types_and_snapshots_without_the_edge_listener_are_not_patched() -> None:
    clusters = TypeResources.of({"a": cluster("a")})
    assert node_resources(edge(10001), type_urls.CLUSTER, clusters) is clusters
    elsewhere = TypeResources.of({"other": listener("other", 9000, "r")})
    assert node_resources(edge(10001), type_urls.LISTENER, elsewhere) is elsewhere


def test_snapshot_versions_map_to_themselves() -> None:
    assert snapshot_version("0123456789abcdef") == "0123456789abcdef"
    assert snapshot_version("") == ""
