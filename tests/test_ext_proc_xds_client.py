"""The ADS client: ACK/NACK per the xDS protocol; reconnects keeping the last good state."""

from __future__ import annotations

import asyncio
import datetime
import functools
import shutil
from pathlib import Path

from edge_tls_fixtures import reissue
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
    REVOCATION_TYPE_URL,
    AdsClient,
    Subscriptions,
    live_subscriptions,
    node_identity,
)
from gpu_router import pki
from gpu_router.api.v1 import revocation_pb2, routing_pb2
from gpu_router.grpc_tls import channel_credentials
from gpu_router.revocation import CRL_FILE, NOTHING_REVOKED, Revocations, revoke

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
    requests = Subscriptions(NODE, live_subscriptions(LiveState(), NOTHING_REVOKED)).initial_requests()
    assert [(r.type_url, list(r.resource_names), r.version_info, r.node.id) for r in requests] == [
        (REVOCATION_TYPE_URL, ["crl"], "", "ext-proc-test-1"),
        (POLICY_TYPE_URL, ["default"], "", "ext-proc-test-1"),
        (HEALTH_TYPE_URL, ["fleet"], "", "ext-proc-test-1"),
        (CLIENT_SPEND_TYPE_URL, ["clients"], "", "ext-proc-test-1"),
    ]


def test_ack_applies_and_nack_keeps_the_last_good_state() -> None:
    live = LiveState()
    subscriptions = Subscriptions(NODE, live_subscriptions(live, NOTHING_REVOKED))
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
    resumed = {r.type_url: r.version_info for r in subscriptions.initial_requests()}
    assert resumed[POLICY_TYPE_URL] == "v1"


def test_wrong_or_wrapped_resources() -> None:
    live = LiveState()
    subscriptions = Subscriptions(NODE, live_subscriptions(live, NOTHING_REVOKED))
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


def test_the_control_planes_crl_revokes_and_another_cas_is_nacked(tmp_path: Path) -> None:
    """The CRL the control plane sends is what a replica refuses edges by, with no file of its
    own; one another CA signed is NACKed and changes nothing, and an empty one (the control
    plane has none) is ACKed. The replica serves once it holds a policy and a CRL, never on a
    policy alone."""
    now = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for directory in (ours, theirs):
        pki.ensure(directory, [pki.Identity(pki.Role.EDGE, "edge-1")], now=now)
    serial = pki.certified_peer((ours / "edge-1.pem").read_bytes()).serial
    for directory in (ours, theirs):
        revoke(directory, ["edge-1"], now=now)
    revocations = Revocations.open(None, ours / pki.CA_FILE)
    live = LiveState()
    subscriptions = Subscriptions(NODE, live_subscriptions(live, revocations))
    subscriptions.on_response(response(POLICY_TYPE_URL, "v1", "p1", default_policy("v1")))

    def crl(directory: Path) -> revocation_pb2.RevocationList:
        return revocation_pb2.RevocationList(crl_pem=(directory / CRL_FILE).read_bytes())

    foreign = subscriptions.on_response(response(REVOCATION_TYPE_URL, "c1", "n1", crl(theirs)))
    assert foreign.version_info == ""  # none ACKed yet
    assert "not signed by the fleet's CA" in foreign.error_detail.message
    assert not revocations.revoked(serial) and not live.routable.is_set()
    empty = subscriptions.on_response(
        response(REVOCATION_TYPE_URL, "c0", "n0", revocation_pb2.RevocationList()))
    assert empty.version_info == "c0" and not empty.HasField("error_detail")
    assert not revocations.revoked(serial) and live.routable.is_set()
    ack = subscriptions.on_response(response(REVOCATION_TYPE_URL, "c2", "n2", crl(ours)))
    assert ack.version_info == "c2" and not ack.HasField("error_detail")
    assert revocations.revoked(serial)


async def _run_client_across_a_restart(live: LiveState, first: FakeAds, port: int) -> FakeAds:
    client = asyncio.create_task(
        AdsClient(
            first.target, Subscriptions(NODE, live_subscriptions(live, NOTHING_REVOKED)),
            max_backoff_s=0.5,
            credentials=FakeAds.client_credentials,
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


def test_the_client_reconnects_with_the_pair_its_files_hold_then(tmp_path: Path) -> None:
    """A renewed certificate is presented from the next connection on, without a restart."""
    given = FakeAds.client_files()
    for name in (pki.CA_FILE, pki.CA_KEY_FILE, given.cert.name, given.key.name):
        shutil.copy(given.ca.parent / name, tmp_path / name)
    files = pki.tls_files(tmp_path, given.cert.stem)
    replica = pki.certified_peer(files.cert.read_bytes())
    assert replica is not None

    async def run() -> None:
        live = LiveState()
        with FakeAds() as first:
            first.publish(POLICY_TYPE_URL, "v1", default_policy("v1"))
            client = asyncio.create_task(AdsClient(
                first.target, Subscriptions(NODE, live_subscriptions(live, NOTHING_REVOKED)),
                max_backoff_s=0.5, credentials=functools.partial(channel_credentials, files),
            ).run())
            try:
                await _until(lambda: live.current.table is not None, "v1 applied")
                assert first.peers == [files.cert.read_bytes()]
                reissue(files, pki.Identity(replica.role, replica.name))
                first.stop()
                with FakeAds(first.port) as second:
                    second.publish(POLICY_TYPE_URL, "v2", default_policy("v2"))
                    await _until(lambda: live.current.table.version == "v2", "v2 applied")
                    assert second.peers == [files.cert.read_bytes()]
                    assert first.peers[0] != second.peers[0]
            finally:
                client.cancel()

    asyncio.run(run())
