"""SnapshotCache: publishing, change notification and waiting for ACKs from a group of nodes."""

from __future__ import annotations

import asyncio

import pytest
from xds_fixtures import cluster, endpoints, listener, route_config

from control_plane.xds import type_urls
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.snapshot import SnapshotInconsistent
from control_plane.xds.stream import Node, Request, XdsStream
from gpu_router.api.v1 import routing_pb2

EDGE = "gpu-router-edge"


def publish(cache: SnapshotCache, *names: str) -> str:
    snapshot = cache.set_types(
        {
            type_urls.CLUSTER: {n: cluster(n) for n in names},
            type_urls.ENDPOINT: {n: endpoints(n, 1) for n in names},
        }
    )
    return snapshot.version(type_urls.CLUSTER)


def connect(
    cache: SnapshotCache, node_id: str, node_cluster: str = EDGE
) -> tuple[XdsStream, list[int]]:
    stream, changes = XdsStream(), []
    cache.open_stream(stream, "ipv4:127.0.0.1:1", lambda: changes.append(1))
    stream.receive(Request(type_url=type_urls.CLUSTER, node=Node(id=node_id, cluster=node_cluster)))
    return stream, changes


def reply(cache: SnapshotCache, stream: XdsStream, error: str | None = None) -> None:
    """Send what the stream needs and answer every response (ACK, or NACK with `error`)."""
    for response in stream.responses(cache.snapshot):
        stream.receive(
            Request(type_url=response.type_url, response_nonce=response.nonce, error_message=error)
        )
    cache.note_acks()


def test_set_types_notifies_open_streams_only_on_a_change() -> None:
    cache = SnapshotCache()
    _, changes = connect(cache, "e1")
    publish(cache, "a")
    publish(cache, "a")
    assert len(changes) == 1
    publish(cache, "a", "b")
    assert len(changes) == 2


def test_inconsistent_update_is_refused_and_the_served_snapshot_kept() -> None:
    cache = SnapshotCache()
    version = publish(cache, "a")
    with pytest.raises(SnapshotInconsistent):
        cache.set_types({type_urls.CLUSTER: {"a": cluster("a"), "b": cluster("b")}})
    assert cache.snapshot.version(type_urls.CLUSTER) == version


def test_wait_acked_is_true_at_once_with_nobody_connected() -> None:
    async def scenario() -> bool:
        cache = SnapshotCache()
        connect(cache, "ext", "gpu-router-ext-proc")
        return await cache.wait_acked(type_urls.CLUSTER, publish(cache, "a"), EDGE, timeout=5)

    assert asyncio.run(scenario())


def test_wait_acked_waits_for_every_node_of_the_group() -> None:
    async def scenario() -> list[object]:
        cache = SnapshotCache()
        first, _ = connect(cache, "e1")
        second, _ = connect(cache, "e2")
        version = publish(cache, "a")
        waiter = asyncio.create_task(cache.wait_acked(type_urls.CLUSTER, version, EDGE, timeout=10))
        reply(cache, first)
        await asyncio.sleep(0)
        pending_after_one = not waiter.done()
        reply(cache, second)
        return [pending_after_one, await waiter]

    assert asyncio.run(scenario()) == [True, True]


def test_a_later_acked_version_satisfies_an_earlier_wait() -> None:
    async def scenario() -> bool:
        cache = SnapshotCache()
        stream, _ = connect(cache, "e1")
        old = publish(cache, "a")
        publish(cache, "a", "b")
        reply(cache, stream)
        return await cache.wait_acked(type_urls.CLUSTER, old, EDGE, timeout=5)

    assert asyncio.run(scenario())


def test_wait_acked_is_false_on_nack_and_on_timeout() -> None:
    async def scenario() -> list[bool]:
        cache = SnapshotCache()
        stream, _ = connect(cache, "e1")
        version = publish(cache, "a")
        timed_out = await cache.wait_acked(type_urls.CLUSTER, version, EDGE, timeout=0.05)
        waiter = asyncio.create_task(cache.wait_acked(type_urls.CLUSTER, version, EDGE, timeout=10))
        await asyncio.sleep(0)
        reply(cache, stream, error="rejected")
        return [timed_out, await waiter]

    assert asyncio.run(scenario()) == [False, False]


def test_a_node_disconnecting_releases_the_wait() -> None:
    async def scenario() -> bool:
        cache = SnapshotCache()
        stream, _ = connect(cache, "e1")
        version = publish(cache, "a")
        waiter = asyncio.create_task(cache.wait_acked(type_urls.CLUSTER, version, EDGE, timeout=10))
        await asyncio.sleep(0)
        cache.close_stream(stream)
        return await waiter

    assert asyncio.run(scenario())


def test_wait_for_an_unpublished_version_is_an_error() -> None:
    with pytest.raises(KeyError):
        asyncio.run(SnapshotCache().wait_acked(type_urls.CLUSTER, "nope", EDGE, timeout=1))


def test_nodes_report_versions_and_nack_detail() -> None:
    cache = SnapshotCache()
    stream, _ = connect(cache, "e1")
    publish(cache, "a")
    reply(cache, stream, error="cluster a: bad")
    cache.set_types({type_urls.ROUTING_POLICY: {"default": routing_pb2.RoutingPolicy(version="1")}})
    [node] = cache.nodes()
    cds = node["types"][type_urls.CLUSTER]
    assert (node["id"], node["cluster"]) == ("e1", EDGE)
    assert cds["acked_version"] == "" and cds["nacked_version"] == cache.snapshot.version(
        type_urls.CLUSTER
    )
    assert cds["last_nack_error"] == "cluster a: bad" and cds["parked"] is True
    assert cds["responses_sent"] == 1


def publish_listener(cache: SnapshotCache, port: int) -> str:
    snapshot = cache.set_types(
        {
            type_urls.LISTENER: {
                "gpu-router.edge": listener("gpu-router.edge", port, "gpu-router.routes")
            },
            type_urls.ROUTE: {"gpu-router.routes": route_config("gpu-router.routes", "a")},
        }
    )
    return snapshot.version(type_urls.LISTENER)


def connect_moved(cache: SnapshotCache, node_id: str, edge_port: int) -> XdsStream:
    stream = XdsStream()
    cache.open_stream(stream, "ipv4:127.0.0.1:1", lambda: None)
    node = Node(id=node_id, cluster=EDGE, edge_port=edge_port)
    stream.receive(Request(type_url=type_urls.LISTENER, node=node))
    return stream


def test_wait_acked_counts_a_node_specific_version_as_its_snapshot_version() -> None:
    async def scenario() -> list[object]:
        cache = SnapshotCache()
        plain = XdsStream()
        cache.open_stream(plain, "ipv4:127.0.0.1:1", lambda: None)
        plain.receive(Request(type_url=type_urls.LISTENER, node=Node(id="e1", cluster=EDGE)))
        moved = connect_moved(cache, "e2", 10001)
        old = publish_listener(cache, 10000)
        reply(cache, plain)
        reply(cache, moved)
        new = publish_listener(cache, 10500)
        waiter = asyncio.create_task(cache.wait_acked(type_urls.LISTENER, new, EDGE, timeout=10))
        reply(cache, plain)
        await asyncio.sleep(0)
        pending_until_the_moved_node_acks = not waiter.done()
        reply(cache, moved)
        return [
            await cache.wait_acked(type_urls.LISTENER, old, EDGE, timeout=1),
            pending_until_the_moved_node_acks,
            await waiter,
            moved.acked_version(type_urls.LISTENER) == f"{new}:10001",
        ]

    assert asyncio.run(scenario()) == [True, True, True, True]


def test_a_nack_of_a_node_specific_version_fails_the_wait() -> None:
    async def scenario() -> bool:
        cache = SnapshotCache()
        moved = connect_moved(cache, "e2", 10001)
        version = publish_listener(cache, 10000)
        waiter = asyncio.create_task(
            cache.wait_acked(type_urls.LISTENER, version, EDGE, timeout=10)
        )
        await asyncio.sleep(0)
        reply(cache, moved, error="cannot bind to 127.0.0.1:10001")
        return await waiter

    assert asyncio.run(scenario()) is False


def test_nodes_show_the_edge_port_and_the_version_that_node_is_served() -> None:
    cache = SnapshotCache()
    moved = connect_moved(cache, "e2", 10001)
    version = publish_listener(cache, 10000)
    reply(cache, moved)
    [node] = cache.nodes()
    lds = node["types"][type_urls.LISTENER]
    assert node["edge_port"] == 10001
    assert lds["acked_version"] == lds["current_version"] == f"{version}:10001"


def test_a_health_push_checks_its_own_names_not_every_listener_and_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from control_plane.xds import snapshot as snapshot_module
    from gpu_router.api.v1 import health_pb2

    cache = SnapshotCache()
    publish(cache, "a", "b")
    walked: list[object] = []
    monkeypatch.setattr(snapshot_module, "_walk", lambda message: walked.append(message) or [])

    cache.set_types({type_urls.HEALTH_SNAPSHOT: {"health": health_pb2.HealthSnapshot()}})
    assert walked == []  # the clusters were not unpacked and walked again
    publish(cache, "a")
    assert len(walked) == 1  # a cluster update is checked whole
