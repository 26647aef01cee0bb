"""Rollout order: union clusters, Envoy ACK, RoutingPolicy, ext_proc ACK, then removal."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from translate_fixtures import attempt_order
from xds_fixtures import policy_file

from control_plane.policy.load import PolicyError
from control_plane.rollout import AckTimeouts, Rollout, prepare_release, with_ext_proc_crl
from control_plane.translate import EdgeSettings
from control_plane.xds import type_urls
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.stream import Node, Request, Response, XdsStream
from gpu_router.api.v1 import routing_pb2

SETTINGS = EdgeSettings(edge_port=10000)


class AutoAckingNode:
    """A connected node that answers every response at once, the way Envoy does, and remembers
    what it saw, in order. Like Envoy, it subscribes to the endpoints of the clusters it has."""

    def __init__(
        self, cache: SnapshotCache, node: Node, type_list: tuple[str, ...], *, ack: bool = True
    ) -> None:
        self.cache, self.ack = cache, ack
        self.seen: list[tuple[str, list[str]]] = []
        self.stream = XdsStream()
        cache.open_stream(self.stream, "test", self.on_change)
        for type_url in type_list:
            self.stream.receive(Request(type_url=type_url, node=node))

    def eds_names(self) -> tuple[str, ...]:
        snapshot = self.cache.snapshot
        return tuple(
            sorted(
                set(snapshot.resources(type_urls.ENDPOINT))
                & set(snapshot.resources(type_urls.CLUSTER))
            )
        )

    def on_change(self) -> None:
        while responses := self.stream.responses(self.cache.snapshot):
            for response in responses:
                self.record(response)
                if not self.ack:
                    continue
                names = self.eds_names() if response.type_url == type_urls.ENDPOINT else ()
                self.stream.receive(
                    Request(
                        type_url=response.type_url,
                        response_nonce=response.nonce,
                        resource_names=names,
                    )
                )
                eds = self.stream.types.get(type_urls.ENDPOINT)
                if (
                    response.type_url == type_urls.CLUSTER
                    and eds is not None
                    and (eds.answered or not eds.nonce)
                ):
                    self.stream.receive(
                        Request(
                            type_url=type_urls.ENDPOINT,
                            response_nonce=eds.nonce,
                            resource_names=self.eds_names(),
                        )
                    )
        self.cache.note_acks()

    def record(self, response: Response) -> None:
        if response.type_url == type_urls.CLUSTER:
            self.seen.append(("clusters", sorted(self.cache.snapshot.resources(type_urls.CLUSTER))))
        elif response.type_url == type_urls.ROUTING_POLICY:
            policy = routing_pb2.RoutingPolicy()
            response.resources[0].Unpack(policy)
            self.seen.append(("policy", sorted(p.cluster for p in policy.providers)))


def providers(*names: str) -> list[str]:
    return sorted([*names, "gpu-router.ext_proc"])


def test_new_clusters_reach_envoy_before_ext_proc_and_removed_ones_leave_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = prepare_release(policy_file(tmp_path / "a.yaml", without=("runpod",)), SETTINGS)
    second = prepare_release(policy_file(tmp_path / "b.yaml", without=("vast",)), SETTINGS)
    log: list[tuple[str, list[str]]] = []

    async def scenario() -> None:
        cache = SnapshotCache()
        edge = AutoAckingNode(
            cache,
            Node(id="e", cluster="gpu-router-edge"),
            (type_urls.CLUSTER, type_urls.ENDPOINT, type_urls.LISTENER),
        )
        ext = AutoAckingNode(
            cache, Node(id="x", cluster="gpu-router-ext-proc"), (type_urls.ROUTING_POLICY,)
        )
        edge.seen = ext.seen = log
        rollout = Rollout(cache, AckTimeouts(edge_s=5, ext_proc_s=5))
        await rollout.apply(first)
        log.clear()
        await rollout.apply(second)
        assert rollout.current is second
        assert cache.nodes()[0]["types"][type_urls.ENDPOINT]["subscribed"] == [
            "coreweave",
            "lambda",
            "runpod",
        ]
        assert sorted(cache.snapshot.resources(type_urls.CLUSTER)) == providers(
            "lambda", "coreweave", "runpod"
        )

    with caplog.at_level(logging.INFO, logger="control_plane.rollout"):
        asyncio.run(scenario())
    applied = [
        (r.edge_acked, r.ext_proc_acked, r.removed_clusters)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "policy_applied"
    ]
    assert applied == [(True, True, []), (True, True, ["vast"])]
    assert log == [
        ("clusters", providers("lambda", "coreweave", "vast", "runpod")),
        ("policy", ["coreweave", "lambda", "runpod"]),
        ("clusters", providers("lambda", "coreweave", "runpod")),
    ]


def test_an_edge_that_does_not_ack_delays_but_does_not_block_the_rollout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    release = prepare_release(policy_file(tmp_path / "a.yaml"), SETTINGS)

    async def scenario() -> list[str]:
        cache = SnapshotCache()
        silent = AutoAckingNode(
            cache, Node(id="e", cluster="gpu-router-edge"), (type_urls.CLUSTER,), ack=False
        )
        await Rollout(cache, AckTimeouts(edge_s=0.05, ext_proc_s=0.05)).apply(release)
        return [kind for kind, _ in silent.seen]

    with caplog.at_level(logging.INFO, logger="control_plane.rollout"):
        assert asyncio.run(scenario()) == ["clusters"]
    missing = [
        (r.type_url, r.node_cluster)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "rollout_not_acked"
    ]
    assert missing == [
        (t, "gpu-router-edge") for t in (type_urls.CLUSTER, type_urls.ENDPOINT, type_urls.LISTENER)
    ]
    [applied] = [r for r in caplog.records if r.getMessage() == "policy_applied"]
    assert (applied.edge_acked, applied.ext_proc_acked) == (False, True)  # type: ignore[attr-defined]


def test_prepare_release_rejects_a_bad_file_before_publishing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: 3\n")
    with pytest.raises(PolicyError):
        prepare_release(bad, SETTINGS)


def test_prepared_release_is_consistent_and_names_every_provider_cluster(tmp_path: Path) -> None:
    release = prepare_release(policy_file(tmp_path / "a.yaml"), SETTINGS)
    assert sorted(release.edge[type_urls.CLUSTER]) == providers(
        "lambda", "coreweave", "vast", "runpod"
    )
    assert sorted(p.cluster for p in release.routing_policy.providers) == [
        "coreweave",
        "lambda",
        "runpod",
        "vast",
    ]


def outlier_5xx(cache: SnapshotCache) -> dict[str, int]:
    """consecutive_5xx of each provider cluster published."""
    clusters = cache.snapshot.resources(type_urls.CLUSTER)
    return {
        name: cluster_pb2.Cluster.FromString(packed.value).outlier_detection.consecutive_5xx.value
        for name, packed in clusters.items()
        if not name.startswith("gpu-router.")
    }


def fallback_order(cache: SnapshotCache) -> list[str]:
    """The providers the latency policy's fallback route for llama-3.1-8b tries, in order."""
    (packed,) = cache.snapshot.resources(type_urls.ROUTE).values()
    routes = route_pb2.RouteConfiguration.FromString(packed.value).virtual_hosts[0].routes
    return attempt_order(next(r for r in routes if r.name == "fallback/interactive/llama-3.1-8b"))


def test_fleet_weights_order_the_fallback_and_watch_the_unhealthy_even_across_a_rollout(
    tmp_path: Path,
) -> None:
    first = prepare_release(policy_file(tmp_path / "a.yaml", without=("runpod",)), SETTINGS)
    second = prepare_release(policy_file(tmp_path / "b.yaml", without=("vast",)), SETTINGS)

    async def scenario() -> None:
        cache = SnapshotCache()
        rollout = Rollout(cache, AckTimeouts(edge_s=1.0, ext_proc_s=1.0))
        rollout.apply_weights({"lambda": 50})  # before any policy: kept for the first one
        await rollout.apply(first)
        assert outlier_5xx(cache) == {"lambda": 1, "coreweave": 5, "vast": 5}
        assert fallback_order(cache)[-1] == "lambda"

        rollout.apply_weights({"lambda": 100, "coreweave": 100, "vast": 0})
        assert outlier_5xx(cache) == {"lambda": 5, "coreweave": 5, "vast": 1}
        assert "vast" not in fallback_order(cache)

        AutoAckingNode(cache, Node(id="e", cluster="gpu-router-edge"), (type_urls.CLUSTER,), ack=False)
        applying = asyncio.create_task(rollout.apply(second))
        await asyncio.sleep(0.01)  # the rollout waits for an ACK that never comes: weights wait
        rollout.apply_weights({"lambda": 0, "coreweave": 100, "vast": 100})
        assert "vast" in cache.snapshot.resources(type_urls.CLUSTER)  # not yet removed
        await applying
        assert outlier_5xx(cache) == {"lambda": 1, "coreweave": 5, "runpod": 5}
        assert "lambda" not in fallback_order(cache)

    asyncio.run(scenario())


def served_crl(cache: SnapshotCache) -> bytes:
    packed = cache.snapshot.resources(type_urls.CLUSTER)["gpu-router.ext_proc"]
    cluster = cluster_pb2.Cluster.FromString(packed.value)
    context = tls_pb2.UpstreamTlsContext()
    assert cluster.transport_socket.typed_config.Unpack(context)
    validation = context.common_tls_context.combined_validation_context
    return validation.default_validation_context.crl.inline_bytes


def test_a_crl_reaches_the_edges_with_the_served_policy_never_an_older_one(
    tmp_path: Path,
) -> None:
    """The CRL follower's change waits for a rollout in progress and applies to what it
    served: the newer policy keeps its providers and gets the CRL."""
    first = prepare_release(policy_file(tmp_path / "a.yaml", without=("runpod",)), SETTINGS)
    second = prepare_release(policy_file(tmp_path / "b.yaml", without=("vast",)), SETTINGS)
    crl = b"-----BEGIN X509 CRL-----\n...\n-----END X509 CRL-----\n"

    async def scenario() -> tuple[list[str], bytes]:
        cache = SnapshotCache()
        # An edge that never acks: each rollout holds the lock for its ack timeout.
        AutoAckingNode(cache, Node(id="e", cluster="gpu-router-edge"), (type_urls.CLUSTER,),
                       ack=False)
        rollout = Rollout(cache, AckTimeouts(edge_s=0.05, ext_proc_s=0.05))
        assert not await rollout.reapply(lambda release: with_ext_proc_crl(release, crl))
        assert rollout.current is None
        await rollout.apply(first)
        newer = asyncio.create_task(rollout.apply(second))
        await asyncio.sleep(0)  # the newer rollout holds the lock, waiting for acks
        assert await rollout.reapply(lambda release: with_ext_proc_crl(release, crl))
        await newer
        assert rollout.current is not None and rollout.current.settings.ext_proc_crl == crl
        served = rollout.current
        # The same CRL again (the follower asks every second): no rollout, the release kept.
        assert not await rollout.reapply(lambda release: with_ext_proc_crl(release, crl))
        assert rollout.current is served
        return sorted(p.name for p in rollout.current.config.providers), served_crl(cache)

    names, served = asyncio.run(scenario())
    assert "vast" not in names and "runpod" in names  # the newer policy, not the first
    assert served == crl
