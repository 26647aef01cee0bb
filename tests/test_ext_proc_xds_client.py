"""The ADS client: ACK/NACK per the xDS protocol; reconnects keeping the last good state."""

from __future__ import annotations

import asyncio

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from ext_proc_fixtures import (
    HEALTH_TYPE_URL,
    POLICY_TYPE_URL,
    FakeAds,
    default_policy,
    health_entry,
    packed,
    snapshot,
)

from ext_proc.router_state import LiveState
from ext_proc.xds_client import (
    CLIENT_SPEND_TYPE_URL,
    AdsClient,
    Subscriptions,
    live_subscriptions,
    node_identity,
)
from gpu_router.api.v1 import routing_pb2

NODE = base_pb2.Node(id="ext-proc-test-1", cluster="gpu-router-ext-proc")


def response(
    type_url: str, version: str, nonce: str, *resources
) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse(
        type_url=type_url,
        version_info=version,
        nonce=nonce,
        resources=[packed(r) for r in resources],
    )


def bad_policy() -> routing_pb2.RoutingPolicy:
    policy = default_policy("v2")
    policy.providers[0].cluster = ""
    return policy


def test_node_identity_follows_the_contract() -> None:
    node = node_identity()
    assert node.cluster == "gpu-router-ext-proc"
    assert node.id.startswith("ext-proc-") and node.id.rsplit("-", 1)[1].isdigit()


def test_initial_requests_subscribe_to_every_type_by_name() -> None:
    requests = Subscriptions(NODE, live_subscriptions(LiveState())).initial_requests()
    assert [(r.type_url, list(r.resource_names), r.version_info, r.node.id) for r in requests] == [
        (POLICY_TYPE_URL, ["default"], "", "ext-proc-test-1"),
        (HEALTH_TYPE_URL, ["fleet"], "", "ext-proc-test-1"),
        (CLIENT_SPEND_TYPE_URL, ["clients"], "", "ext-proc-test-1"),
    ]


def test_ack_applies_and_nack_keeps_the_last_good_state() -> None:
    live = LiveState()
    subscriptions = Subscriptions(NODE, live_subscriptions(live))
    ack = subscriptions.on_response(response(POLICY_TYPE_URL, "v1", "n1", default_policy("v1")))
    assert (ack.version_info, ack.response_nonce, ack.HasField("error_detail")) == (
        "v1",
        "n1",
        False,
    )
    table = live.current.table
    assert table is not None and table.version == "v1"
    nack = subscriptions.on_response(response(POLICY_TYPE_URL, "v2", "n2", bad_policy()))
    assert (nack.version_info, nack.response_nonce) == ("v1", "n2")
    assert nack.error_detail.message == "provider 'lambda' has no cluster"
    assert live.current.table is table
    health = subscriptions.on_response(
        response(HEALTH_TYPE_URL, "h1", "n3", snapshot(health_entry("vast", latency_ms=5)))
    )
    assert health.version_info == "h1"
    assert live.current.table is table and live.current.health.latency_ms("vast", "bge-large") == 5
    assert subscriptions.initial_requests()[0].version_info == "v1"


def test_wrong_or_wrapped_resources() -> None:
    live = LiveState()
    subscriptions = Subscriptions(NODE, live_subscriptions(live))
    wrong_type = subscriptions.on_response(response(POLICY_TYPE_URL, "v1", "n1", snapshot()))
    assert (
        "expected type.googleapis.com/gpu_router.api.v1.RoutingPolicy"
        in wrong_type.error_detail.message
    )
    wrapped = discovery_pb2.Resource(
        name="default", version="v1", resource=packed(default_policy("w"))
    )
    ack = subscriptions.on_response(response(POLICY_TYPE_URL, "v1", "n2", wrapped))
    assert not ack.HasField("error_detail") and live.current.table.version == "w"
    empty = subscriptions.on_response(response(POLICY_TYPE_URL, "v3", "n3"))
    assert empty.version_info == "v3" and live.current.table.version == "w"
    unknown = subscriptions.on_response(response("type.googleapis.com/x.Y", "1", "n4"))
    assert unknown.error_detail.message == "type not subscribed"


async def _run_client_across_a_restart(live: LiveState, first: FakeAds, port: int) -> FakeAds:
    client = asyncio.create_task(
        AdsClient(
            first.target, Subscriptions(NODE, live_subscriptions(live)), max_backoff_s=0.5,
            credentials=FakeAds.client_credentials(),
        ).run()
    )
    try:
        await _until(
            lambda: (
                live.current.table is not None
                and any(r.version_info == "v1" for r in first.requests_for(POLICY_TYPE_URL))
            ),
            "v1 applied and ACKed",
        )
        first.publish(POLICY_TYPE_URL, "v2", bad_policy())
        await _until(
            lambda: any(r.error_detail.message for r in first.requests_for(POLICY_TYPE_URL)),
            "a NACK",
        )
        first.stop()
        await asyncio.sleep(1.0)  # the client retries against a closed port meanwhile
        assert live.current.table is not None and live.current.table.version == "v1"
        second = FakeAds(port).__enter__()
        second.publish(POLICY_TYPE_URL, "v3", default_policy("v3"))
        await _until(lambda: live.current.table.version == "v3", "v3 applied after the restart")
        return second
    finally:
        client.cancel()


async def _until(check, what: str, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_client_reconnects_and_resumes_from_the_acked_version() -> None:
    live = LiveState()
    with FakeAds() as first:
        first.publish(POLICY_TYPE_URL, "v1", default_policy("v1"))
        second = asyncio.run(_run_client_across_a_restart(live, first, first.port))
    try:
        resumed = second.requests_for(POLICY_TYPE_URL)[0]
        assert (resumed.version_info, resumed.response_nonce) == ("v1", "")
    finally:
        second.stop()
