"""The per-stream xDS state machine without gRPC: subscribe, ACK, NACK/park, stale nonce, order."""

from __future__ import annotations

from envoy.config.listener.v3 import listener_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message
from xds_fixtures import cluster, endpoints, listener, route_config

from control_plane.xds import type_urls
from control_plane.xds.snapshot import Snapshot
from control_plane.xds.stream import (
    Acked,
    Nacked,
    Node,
    Request,
    Response,
    StaleNonce,
    Subscribed,
    XdsStream,
)
from gpu_router.api.v1 import health_pb2, routing_pb2

EDGE = Node(id="edge-1", cluster="gpu-router-edge")


def snapshot(
    *clusters: str, routes: tuple[str, ...] = ("gpu-router.routes",), policy_version: str = "p1"
) -> Snapshot:
    """An edge snapshot with EDS clusters, their endpoints, a listener and its routes."""
    updates: dict[str, dict[str, Message]] = {
        type_urls.CLUSTER: {name: cluster(name) for name in clusters},
        type_urls.ENDPOINT: {name: endpoints(name, 8000) for name in clusters},
        type_urls.LISTENER: {"gpu-router.edge": listener("gpu-router.edge", 10000, routes[0])},
        type_urls.ROUTE: {name: route_config(name, clusters[0]) for name in routes},
        type_urls.ROUTING_POLICY: {"default": routing_pb2.RoutingPolicy(version=policy_version)},
    }
    return Snapshot().with_types(updates)


def subscribe(stream: XdsStream, type_url: str, *names: str, node: Node | None = None) -> list:
    return stream.receive(Request(type_url=type_url, resource_names=names, node=node))


def answer(stream: XdsStream, response: Response, *names: str, error: str | None = None) -> list:
    """ACK (or NACK with `error`) `response` the way Envoy does."""
    state = stream.types[response.type_url]
    kept = response.version if error is None else state.acked_version
    return stream.receive(
        Request(
            type_url=response.type_url,
            version_info=kept,
            resource_names=names,
            response_nonce=response.nonce,
            error_message=error,
        )
    )


def only(responses: list[Response], type_url: str) -> Response:
    matching = [r for r in responses if r.type_url == type_url]
    assert len(matching) == 1, responses
    return matching[0]


def names_of(response: Response) -> list[str]:
    return [_name(packed) for packed in response.resources]


def _name(packed: any_pb2.Any) -> str:
    for message_type in (cluster("x"), endpoints("x", 1), route_config("x", "x")):
        if packed.Is(message_type.DESCRIPTOR):
            decoded = type(message_type)()
            packed.Unpack(decoded)
            return getattr(decoded, "cluster_name", "") or decoded.name  # type: ignore[attr-defined]
    raise AssertionError(packed.type_url)


def test_first_request_subscribes_and_records_node_and_running_version() -> None:
    stream = XdsStream()
    events = stream.receive(Request(type_url=type_urls.CLUSTER, version_info="old", node=EDGE))
    assert events == [Subscribed(type_url=type_urls.CLUSTER, names=(), wildcard=True)]
    assert stream.node == EDGE
    assert stream.acked_version(type_urls.CLUSTER) == "old"


def test_wildcard_types_get_the_full_set_and_named_types_only_what_was_asked() -> None:
    stream = XdsStream()
    snap = snapshot("a", "b")
    subscribe(stream, type_urls.CLUSTER, node=EDGE)
    subscribe(stream, type_urls.ENDPOINT, "b", "missing")
    responses = stream.responses(snap)
    assert names_of(only(responses, type_urls.CLUSTER)) == ["a", "b"]
    assert names_of(only(responses, type_urls.ENDPOINT)) == ["b"]


def test_star_means_wildcard_but_only_for_types_that_allow_it() -> None:
    stream = XdsStream()
    assert subscribe(stream, type_urls.CLUSTER, "*")[0].wildcard
    assert not subscribe(stream, type_urls.ENDPOINT, "*")[0].wildcard
    assert only(stream.responses(snapshot("a")), type_urls.CLUSTER)
    assert [r.type_url for r in stream.responses(snapshot("a"))] == []


def test_named_type_waits_until_a_subscribed_name_exists() -> None:
    stream = XdsStream()
    subscribe(stream, type_urls.ENDPOINT, "later")
    assert stream.responses(snapshot("a")) == []
    assert names_of(only(stream.responses(snapshot("a", "later")), type_urls.ENDPOINT)) == ["later"]


def test_unpublished_type_is_not_answered_but_an_empty_published_one_is() -> None:
    stream = XdsStream()
    subscribe(stream, type_urls.HEALTH_SNAPSHOT)
    subscribe(stream, type_urls.SECRET, "gpu-router.credential.a")
    assert stream.responses(snapshot("a")) == []
    empty = Snapshot().with_types({type_urls.CLUSTER: {}})
    subscribe(stream, type_urls.CLUSTER)
    response = only(stream.responses(empty), type_urls.CLUSTER)
    assert response.resources == ()
    with_health = empty.with_types(
        {type_urls.HEALTH_SNAPSHOT: {"fleet": health_pb2.HealthSnapshot()}}
    )
    assert only(stream.responses(with_health), type_urls.HEALTH_SNAPSHOT).version


def test_responses_follow_the_send_order_whatever_the_subscription_order() -> None:
    stream = XdsStream()
    for type_url in (
        type_urls.ROUTING_POLICY,
        type_urls.ROUTE,
        type_urls.LISTENER,
        type_urls.ENDPOINT,
        type_urls.CLUSTER,
    ):
        names = ("gpu-router.routes",) if type_url == type_urls.ROUTE else ("a",)
        subscribe(
            stream, type_url, *(names if type_url in (type_urls.ROUTE, type_urls.ENDPOINT) else ())
        )
    order = [r.type_url for r in stream.responses(snapshot("a"))]
    assert order == [
        type_urls.CLUSTER,
        type_urls.ENDPOINT,
        type_urls.LISTENER,
        type_urls.ROUTE,
        type_urls.ROUTING_POLICY,
    ]


def test_ack_records_the_version_and_nothing_is_resent_while_unchanged() -> None:
    stream = XdsStream()
    snap = snapshot("a")
    subscribe(stream, type_urls.CLUSTER, node=EDGE)
    response = only(stream.responses(snap), type_urls.CLUSTER)
    assert answer(stream, response) == [Acked(type_url=type_urls.CLUSTER, version=response.version)]
    assert stream.acked_version(type_urls.CLUSTER) == snap.version(type_urls.CLUSTER)
    assert stream.responses(snap) == []
    assert stream.types[type_urls.CLUSTER].responses_sent == 1


def test_each_response_has_a_fresh_nonce_and_the_type_version() -> None:
    stream = XdsStream()
    subscribe(stream, type_urls.CLUSTER)
    first = only(stream.responses(snapshot("a")), type_urls.CLUSTER)
    answer(stream, first)
    second = only(stream.responses(snapshot("a", "b")), type_urls.CLUSTER)
    assert first.nonce != second.nonce
    assert (first.version, second.version) == (
        snapshot("a").version(type_urls.CLUSTER),
        snapshot("a", "b").version(type_urls.CLUSTER),
    )


def test_stale_nonce_is_ignored() -> None:
    stream = XdsStream()
    subscribe(stream, type_urls.CLUSTER)
    first = only(stream.responses(snapshot("a")), type_urls.CLUSTER)
    second = only(stream.responses(snapshot("a", "b")), type_urls.CLUSTER)
    assert answer(stream, first) == [StaleNonce(type_url=type_urls.CLUSTER, nonce=first.nonce)]
    assert stream.acked_version(type_urls.CLUSTER) == ""
    assert answer(stream, second) == [Acked(type_url=type_urls.CLUSTER, version=second.version)]


def test_stale_nack_does_not_park() -> None:
    stream = XdsStream()
    subscribe(stream, type_urls.CLUSTER)
    first = only(stream.responses(snapshot("a")), type_urls.CLUSTER)
    only(stream.responses(snapshot("a", "b")), type_urls.CLUSTER)
    assert isinstance(answer(stream, first, error="bad")[0], StaleNonce)
    assert stream.types[type_urls.CLUSTER].parked_on is None


def test_nack_keeps_the_acked_version_and_parks_until_the_config_changes() -> None:
    stream = XdsStream()
    good, bad, fixed = snapshot("a"), snapshot("a", "b"), snapshot("a", "c")
    subscribe(stream, type_urls.CLUSTER, node=EDGE)
    answer(stream, only(stream.responses(good), type_urls.CLUSTER))
    rejected = only(stream.responses(bad), type_urls.CLUSTER)
    events = answer(stream, rejected, error="cluster b: invalid")
    assert events == [
        Nacked(
            type_url=type_urls.CLUSTER,
            version=bad.version(type_urls.CLUSTER),
            kept_version=good.version(type_urls.CLUSTER),
            error="cluster b: invalid",
        )
    ]
    assert stream.acked_version(type_urls.CLUSTER) == good.version(type_urls.CLUSTER)
    for _ in range(3):
        assert stream.responses(bad) == []
    assert stream.types[type_urls.CLUSTER].responses_sent == 2
    unparked = only(stream.responses(fixed), type_urls.CLUSTER)
    assert unparked.version == fixed.version(type_urls.CLUSTER)
    assert stream.types[type_urls.CLUSTER].parked_on is None


def test_rolling_back_to_the_acked_version_after_a_nack_is_sent() -> None:
    stream = XdsStream()
    good, bad = snapshot("a"), snapshot("a", "b")
    subscribe(stream, type_urls.CLUSTER)
    answer(stream, only(stream.responses(good), type_urls.CLUSTER))
    answer(stream, only(stream.responses(bad), type_urls.CLUSTER), error="no")
    assert only(stream.responses(good), type_urls.CLUSTER).version == good.version(
        type_urls.CLUSTER
    )
    assert stream.responses(bad)[0].version == bad.version(type_urls.CLUSTER)


def test_a_later_request_with_the_nacked_nonce_is_not_an_ack() -> None:
    stream = XdsStream()
    subscribe(stream, type_urls.ENDPOINT, "a")
    rejected = only(stream.responses(snapshot("a", "b")), type_urls.ENDPOINT)
    answer(stream, rejected, "a", error="bad endpoints")
    events = answer(stream, rejected, "a", "b")
    assert events == [Subscribed(type_url=type_urls.ENDPOINT, names=("a", "b"), wildcard=False)]
    assert stream.acked_version(type_urls.ENDPOINT) == ""


def test_resubscribing_a_parked_named_type_sends_the_new_names() -> None:
    stream = XdsStream()
    snap = snapshot("a", "b")
    subscribe(stream, type_urls.ENDPOINT, "a")
    rejected = only(stream.responses(snap), type_urls.ENDPOINT)
    answer(stream, rejected, "a", error="bad")
    assert stream.responses(snap) == []
    answer(stream, rejected, "a", "b")
    assert names_of(only(stream.responses(snap), type_urls.ENDPOINT)) == ["a", "b"]


def test_ack_that_changes_the_subscription_gets_the_new_names() -> None:
    stream = XdsStream()
    snap = snapshot("a", "b")
    subscribe(stream, type_urls.ENDPOINT, "a")
    first = only(stream.responses(snap), type_urls.ENDPOINT)
    assert answer(stream, first, "a", "b") == [
        Acked(type_url=type_urls.ENDPOINT, version=first.version),
        Subscribed(type_url=type_urls.ENDPOINT, names=("a", "b"), wildcard=False),
    ]
    assert names_of(only(stream.responses(snap), type_urls.ENDPOINT)) == ["a", "b"]


def test_unsubscribing_every_name_sends_nothing_more() -> None:
    stream = XdsStream()
    snap = snapshot("a")
    subscribe(stream, type_urls.ENDPOINT, "a")
    answer(stream, only(stream.responses(snap), type_urls.ENDPOINT))
    stream.receive(
        Request(type_url=type_urls.ENDPOINT, response_nonce=stream.types[type_urls.ENDPOINT].nonce)
    )
    assert stream.responses(snapshot("a", "b")) == []


def test_every_cds_response_resends_eds_even_when_endpoints_are_unchanged() -> None:
    stream = XdsStream()
    subscribe(stream, type_urls.CLUSTER)
    subscribe(stream, type_urls.ENDPOINT, "a")
    first = stream.responses(snapshot("a"))
    for response in first:
        answer(stream, response, *(("a",) if response.type_url == type_urls.ENDPOINT else ()))
    again = stream.responses(snapshot("a", "b"))
    assert [r.type_url for r in again] == [type_urls.CLUSTER, type_urls.ENDPOINT]
    assert names_of(again[1]) == ["a"]


def test_changes_of_unsubscribed_types_send_nothing() -> None:
    stream = XdsStream()
    subscribe(
        stream,
        type_urls.ROUTING_POLICY,
        node=Node(id="ext-proc-h-1", cluster="gpu-router-ext-proc"),
    )
    answer(stream, only(stream.responses(snapshot("a")), type_urls.ROUTING_POLICY))
    assert stream.responses(snapshot("a", "b")) == []
    assert only(stream.responses(snapshot("a", policy_version="p2")), type_urls.ROUTING_POLICY)


def test_first_response_is_sent_even_if_the_client_already_runs_that_version() -> None:
    stream = XdsStream()
    snap = snapshot("a")
    stream.receive(
        Request(type_url=type_urls.CLUSTER, version_info=snap.version(type_urls.CLUSTER))
    )
    assert only(stream.responses(snap), type_urls.CLUSTER)


MOVED_EDGE = Node(id="edge-2", cluster="gpu-router-edge", edge_port=10001)


def listener_port(response: Response) -> int:
    [packed] = response.resources
    decoded = listener_pb2.Listener()
    packed.Unpack(decoded)
    return decoded.address.socket_address.port_value


def test_a_node_with_an_edge_port_gets_its_own_listener_and_version() -> None:
    moved, plain = XdsStream(), XdsStream()
    subscribe(moved, type_urls.LISTENER, node=MOVED_EDGE)
    subscribe(plain, type_urls.LISTENER, node=EDGE)
    snap = snapshot("a")
    mine, theirs = (
        only(moved.responses(snap), type_urls.LISTENER),
        only(plain.responses(snap), type_urls.LISTENER),
    )
    assert (listener_port(mine), listener_port(theirs)) == (10001, 10000)
    assert theirs.version == snap.version(type_urls.LISTENER)
    assert mine.version == f"{theirs.version}:10001"
    assert answer(moved, mine) == [Acked(type_url=type_urls.LISTENER, version=mine.version)]
    assert moved.acked_version(type_urls.LISTENER) == mine.version
    assert moved.responses(snap) == []


def test_a_node_version_changes_with_the_snapshot_and_unparks_after_a_nack() -> None:
    stream = XdsStream()
    subscribe(stream, type_urls.LISTENER, node=MOVED_EDGE)
    first = only(stream.responses(snapshot("a")), type_urls.LISTENER)
    answer(stream, first, error="cannot bind 10001")
    assert stream.responses(snapshot("a")) == []
    changed = snapshot("a", routes=("gpu-router.routes-2",))
    second = only(stream.responses(changed), type_urls.LISTENER)
    assert second.version == f"{changed.version(type_urls.LISTENER)}:10001" != first.version
    assert listener_port(second) == 10001


def test_the_view_is_computed_once_per_snapshot_entry() -> None:
    stream = XdsStream()
    subscribe(stream, type_urls.LISTENER, node=MOVED_EDGE)
    snap = snapshot("a")
    first = stream.view(type_urls.LISTENER, snap)
    assert stream.view(type_urls.LISTENER, snap.with_types({type_urls.CLUSTER: {}})) is first
    assert stream.view(type_urls.HEALTH_SNAPSHOT, snap) is None
