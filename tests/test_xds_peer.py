"""The role a stream's peer gets from its certificate, and what a stream of each role may have."""

from __future__ import annotations

import datetime

from cryptography.hazmat.primitives import serialization
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from control_plane.xds import type_urls
from control_plane.xds.peer import Peer, peer_of
from control_plane.xds.snapshot import Snapshot
from control_plane.xds.stream import Forbidden, Request, Subscribed, XdsStream
from gpu_router import pki
from gpu_router.api.v1 import routing_pb2

NOW = datetime.datetime.now(datetime.UTC)
CA, CA_KEY = pki.make_ca(NOW)


def pem_of(identity: pki.Identity) -> bytes:
    cert, _ = pki.make_leaf(CA, CA_KEY, identity, NOW)
    return cert.public_bytes(serialization.Encoding.PEM)


def test_the_role_is_the_certificates_never_the_claim() -> None:
    edge = peer_of("ipv4:1", {"x509_pem_cert": [pem_of(pki.Identity(pki.Role.EDGE, "e1"))]})
    assert (edge.role, edge.name) == (pki.Role.EDGE, "e1")
    ext_proc = peer_of("ipv4:2", {"x509_pem_cert": [pem_of(pki.Identity(pki.Role.EXT_PROC, "x"))]})
    assert ext_proc.role is pki.Role.EXT_PROC
    assert peer_of("ipv4:3", {}).role is None
    assert peer_of("ipv4:4", {"x509_pem_cert": [b"not a certificate"]}).role is None
    # Compose's Redis serves with a certificate of the fleet's CA: it is no peer of ours.
    redis = pem_of(pki.Identity(pki.Role.REDIS, "redis"))
    assert peer_of("ipv4:5", {"x509_pem_cert": [redis]}).role is None


def test_only_an_edge_may_have_secrets_and_an_ext_proc_only_our_types() -> None:
    edge, ext_proc, stranger = (Peer("p", role) for role in (pki.Role.EDGE, pki.Role.EXT_PROC, None))
    assert edge.may_have(type_urls.SECRET) and edge.may_have(type_urls.CLUSTER)
    assert not edge.may_have(type_urls.ROUTING_POLICY)
    assert ext_proc.may_have(type_urls.ROUTING_POLICY) and ext_proc.may_have(type_urls.HEALTH_SNAPSHOT)
    assert not any(ext_proc.may_have(t) for t in (type_urls.SECRET, type_urls.CLUSTER, type_urls.LISTENER))
    assert not any(stranger.may_have(t) for t in type_urls.SEND_ORDER)
    control_plane = Peer("p", pki.Role.CONTROL_PLANE)
    assert not any(control_plane.may_have(t) for t in type_urls.SEND_ORDER)


def test_a_stream_never_sends_a_type_its_peer_may_not_have() -> None:
    snapshot = Snapshot().with_types({
        type_urls.SECRET: {"gpu-router.credential.vast": secret_pb2.Secret(
            name="gpu-router.credential.vast")},
        type_urls.ROUTING_POLICY: {"default": routing_pb2.RoutingPolicy(version="v1")},
    })
    stream = XdsStream(allowed=Peer("p", pki.Role.EXT_PROC).may_have)
    asked = stream.receive(Request(type_url=type_urls.SECRET,
                                   resource_names=("gpu-router.credential.vast",)))
    assert asked == [Forbidden(type_url=type_urls.SECRET, names=("gpu-router.credential.vast",))]
    assert stream.receive(Request(type_url=type_urls.ROUTING_POLICY)) == [
        Subscribed(type_url=type_urls.ROUTING_POLICY, names=(), wildcard=True)]
    assert [r.type_url for r in stream.responses(snapshot)] == [type_urls.ROUTING_POLICY]
    assert type_urls.SECRET not in stream.types


def test_an_edge_speaks_only_for_the_node_its_certificate_names() -> None:
    edge = Peer("p", pki.Role.EDGE, "edge-1")
    assert edge.may_be("edge-1") and not edge.may_be("edge-2") and not edge.may_be("")
    assert Peer("p", pki.Role.EXT_PROC, "ext-proc-1").may_be("ext-proc-1-worker-9")
    assert not Peer("p", None).may_be("edge-1")  # no certificate of ours: no node at all
