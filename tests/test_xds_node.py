"""Per-node views: node metadata moves one node's edge listener, and points its ext_proc cluster
at the node's secrets files, each with a version of its own."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import any_pb2, json_format, struct_pb2
from xds_fixtures import cluster, listener

from control_plane.translate.clusters import ext_proc_cluster
from control_plane.translate.names import EDGE_CERTIFICATE_SECRET, EXT_PROC_CLUSTER, FLEET_CA_SECRET
from control_plane.translate.settings import EdgeSettings
from control_plane.xds import type_urls
from control_plane.xds.node import (
    Node,
    NodeMetadataError,
    edge_port_from_metadata,
    node_resources,
    secrets_dir_from_metadata,
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


@pytest.mark.parametrize(
    ("document", "directory"),
    [
        ({"gpu_router": {"edge_port": 10001}}, None),
        ({"gpu_router": {"secrets_dir": "/var/lib/gpu-router/edge-1.secrets"}},
         "/var/lib/gpu-router/edge-1.secrets"),
    ],
)
def test_the_secrets_directory_is_read_from_our_namespace(document: dict,
                                                           directory: str | None) -> None:
    assert secrets_dir_from_metadata(metadata(document)) == directory


@pytest.mark.parametrize(
    ("value", "shown"),
    [("secrets", 'got "secrets"'), ("", 'got ""'), (7, "got 7"),
     ("/etc/gpu\n", 'got "/etc/gpu\\\\n"')],
)
def test_a_secrets_directory_that_is_no_absolute_path_is_refused(value: object,
                                                                  shown: str) -> None:
    with pytest.raises(NodeMetadataError, match=f"secrets_dir must be an absolute path, {shown}"):
        secrets_dir_from_metadata(metadata({"gpu_router": {"secrets_dir": value}}))


def secret_sources(packed: any_pb2.Any) -> dict[str, str]:
    """Each secret the cluster's TLS names -> the SDS file it is read from ("" for static)."""
    decoded, context = cluster_pb2.Cluster(), tls_pb2.UpstreamTlsContext()
    packed.Unpack(decoded)
    decoded.transport_socket.typed_config.Unpack(context)
    common = context.common_tls_context
    configs = [*common.tls_certificate_sds_secret_configs,
               common.combined_validation_context.validation_context_sds_secret_config]
    return {c.name: c.sds_config.path_config_source.path for c in configs}


def test_a_node_with_a_secrets_directory_reads_the_ext_proc_clusters_secrets_there() -> None:
    entry = TypeResources.of({EXT_PROC_CLUSTER: ext_proc_cluster(EdgeSettings()),
                              "a": cluster("a")})
    node = Node(id="edge-1", cluster="gpu-router-edge", secrets_dir="/srv/edge-1.secrets")
    view = node_resources(node, type_urls.CLUSTER, entry)
    assert secret_sources(view.resources[EXT_PROC_CLUSTER]) == {
        EDGE_CERTIFICATE_SECRET: "/srv/edge-1.secrets/gpu-router.edge-certificate.sds.yaml",
        FLEET_CA_SECRET: "/srv/edge-1.secrets/gpu-router.fleet-ca.sds.yaml"}
    assert secret_sources(entry.resources[EXT_PROC_CLUSTER]) == {
        EDGE_CERTIFICATE_SECRET: "", FLEET_CA_SECRET: ""}, "the shared snapshot is untouched"
    assert view.resources["a"] == entry.resources["a"]
    assert snapshot_version(view.version) == entry.version != view.version
    elsewhere = Node(id="edge-2", cluster="gpu-router-edge", secrets_dir="/srv/edge-2.secrets")
    assert node_resources(elsewhere, type_urls.CLUSTER, entry).version != view.version
    # Static secrets (no directory), other types, a snapshot without the cluster: as they are.
    assert node_resources(edge(None), type_urls.CLUSTER, entry) is entry
    assert node_resources(node, type_urls.LISTENER, listeners()).version == listeners().version
    without = TypeResources.of({"a": cluster("a")})
    assert node_resources(node, type_urls.CLUSTER, without) is without
