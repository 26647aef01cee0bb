"""Snapshots: content-hash versions and the consistency check."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from google.protobuf import any_pb2
from xds_fixtures import ADS, cluster, endpoints, listener, route_config

from control_plane.xds import type_urls
from control_plane.xds.snapshot import Snapshot, SnapshotInconsistent


def edge(*clusters: str) -> Snapshot:
    return Snapshot().with_types(
        {
            type_urls.CLUSTER: {name: cluster(name) for name in clusters},
            type_urls.ENDPOINT: {name: endpoints(name, 9000) for name in clusters},
            type_urls.LISTENER: {
                "gpu-router.edge": listener("gpu-router.edge", 10000, "gpu-router.routes")
            },
            type_urls.ROUTE: {"gpu-router.routes": route_config("gpu-router.routes", clusters[0])},
        }
    )


def tls_cluster(name: str, secret: str) -> cluster_pb2.Cluster:
    """A cluster whose client certificate comes from SDS secret `secret`."""
    context = tls_pb2.UpstreamTlsContext(
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_certificate_sds_secret_configs=[
                secret_pb2.SdsSecretConfig(name=secret, sds_config=ADS)
            ]
        )
    )
    packed = any_pb2.Any()
    packed.Pack(context)
    built = cluster(name)
    built.transport_socket.name = "envoy.transport_sockets.tls"
    built.transport_socket.typed_config.CopyFrom(packed)
    return built


def test_version_is_a_content_hash_independent_of_insertion_order() -> None:
    forward = Snapshot().with_types({type_urls.CLUSTER: {"a": cluster("a"), "b": cluster("b")}})
    backward = Snapshot().with_types({type_urls.CLUSTER: {"b": cluster("b"), "a": cluster("a")}})
    changed = Snapshot().with_types(
        {type_urls.CLUSTER: {"a": cluster("a"), "b": endpoints("b", 1)}}
    )
    assert forward.version(type_urls.CLUSTER) == backward.version(type_urls.CLUSTER)
    assert forward.version(type_urls.CLUSTER) != changed.version(type_urls.CLUSTER)


def test_with_types_replaces_named_types_and_keeps_the_rest() -> None:
    before = edge("a", "b")
    after = before.with_types({type_urls.CLUSTER: {"a": cluster("a")}})
    assert list(after.resources(type_urls.CLUSTER)) == ["a"]
    assert after.version(type_urls.LISTENER) == before.version(type_urls.LISTENER)
    assert list(before.resources(type_urls.CLUSTER)) == ["a", "b"]


def test_absent_and_empty_types_differ() -> None:
    snapshot = Snapshot().with_types({type_urls.SECRET: {}})
    assert snapshot.has(type_urls.SECRET) and snapshot.version(type_urls.SECRET)
    assert (
        not snapshot.has(type_urls.HEALTH_SNAPSHOT)
        and snapshot.version(type_urls.HEALTH_SNAPSHOT) == ""
    )


def test_consistent_snapshot_passes() -> None:
    edge("a", "b").check_consistent()


def test_eds_cluster_without_endpoints_is_inconsistent() -> None:
    snapshot = edge("a").with_types({type_urls.CLUSTER: {"a": cluster("a"), "b": cluster("b")}})
    with pytest.raises(SnapshotInconsistent, match="cluster 'b' needs endpoints 'b'"):
        snapshot.check_consistent()


def test_listener_naming_a_missing_route_configuration_is_inconsistent() -> None:
    snapshot = edge("a").with_types({type_urls.ROUTE: {}})
    with pytest.raises(SnapshotInconsistent, match="needs route configuration 'gpu-router.routes'"):
        snapshot.check_consistent()


def test_sds_secret_references_are_found_inside_typed_configs() -> None:
    secret = "gpu-router.credential.a"
    snapshot = edge("a").with_types({type_urls.CLUSTER: {"a": tls_cluster("a", secret)}})
    with pytest.raises(SnapshotInconsistent, match=f"needs secret '{secret}'"):
        snapshot.check_consistent()
    snapshot.with_types(
        {type_urls.SECRET: {secret: secret_pb2.Secret(name=secret)}}
    ).check_consistent()


def test_resource_keyed_under_another_name_is_inconsistent() -> None:
    snapshot = edge("a").with_types({type_urls.ENDPOINT: {"a": endpoints("other", 1)}})
    with pytest.raises(SnapshotInconsistent) as raised:
        snapshot.check_consistent()
    assert raised.value.problems == ["ClusterLoadAssignment keyed 'a' is named 'other'"]


def test_unregistered_typed_config_is_skipped_not_fatal() -> None:
    unknown = any_pb2.Any(type_url="type.googleapis.com/example.Unknown", value=b"\x08\x01")
    built = cluster("a")
    built.metadata.CopyFrom(base_pb2.Metadata(typed_filter_metadata={"x": unknown}))
    edge("a").with_types({type_urls.CLUSTER: {"a": built}}).check_consistent()
