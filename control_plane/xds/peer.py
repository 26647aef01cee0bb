"""Who is on the other end of a gRPC stream, from its TLS certificate, and what it may do.

A peer's role comes from the SPIFFE URI SAN of the client certificate it presented in the
mutual-TLS handshake (gpu_router/pki.py), never from the node id or cluster it claims:
anyone can write those. An edge's node id must be its certificate's name (Peer.may_be). Edge Envoys may fetch Envoy's resource types (secrets included) and
send access logs and load reports; ext_proc replicas only fetch our own types (the
RevocationList, RoutingPolicy, HealthSnapshot and ClientSpendSnapshot). Any other peer (no certificate, another role) is refused; each refusal is
one JSON line, `peer_refused`. So is a certificate the fleet's CRL revokes
(gpu_router/revocation.py): at a stream's start, and at its next message or response once
revoked meanwhile (Peer.revoked).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from control_plane.xds import type_urls
from gpu_router.pki import Role, certified_peer, peer_certificate
from gpu_router.revocation import NOTHING_REVOKED, REVOKED, Revocations

log = logging.getLogger(__name__)

EDGE_TYPES: frozenset[str] = frozenset(
    {type_urls.LISTENER, type_urls.ROUTE, type_urls.CLUSTER, type_urls.ENDPOINT, type_urls.SECRET}
)
"""What an edge Envoy may subscribe to: Envoy's types, provider secrets included."""
OWN_TYPE_PREFIX = "type.googleapis.com/gpu_router."
"""What an ext_proc replica may subscribe to: our own types (RoutingPolicy, HealthSnapshot...),
never Envoy's, so never a Secret."""
NODE_CLUSTERS: Mapping[Role, str] = {Role.EDGE: "gpu-router-edge", Role.EXT_PROC: "gpu-router-ext-proc"}
"""The node cluster each role must claim in its DiscoveryRequests."""


@dataclass(frozen=True, slots=True)
class Peer:
    address: str
    """context.peer(), e.g. ipv4:127.0.0.1:51234."""
    role: Role | None
    """None: no certificate, or one that names none of our roles."""
    name: str = ""
    """The certificate's node or replica name."""
    serial: int | None = None
    """The certificate's serial number (what a CRL names)."""
    revocations: Revocations = field(default=NOTHING_REVOKED, compare=False, repr=False)

    def revoked(self) -> bool:
        """Whether the fleet's CRL revokes this peer's certificate now (read within a second
        of a change): a stream admitted before is refused at its next message."""
        return self.revocations.revoked(self.serial)

    def may_have(self, type_url: str) -> bool:
        """Whether this peer may subscribe to (and be sent) resources of `type_url`."""
        if self.role is Role.EDGE:
            return type_url in EDGE_TYPES
        if self.role is Role.EXT_PROC:
            return type_url.startswith(OWN_TYPE_PREFIX)
        return False

    def may_be(self, node_id: str) -> bool:
        """Whether this peer may call itself `node_id`: an edge only by its certificate's name,
        since its listener port and health samples go by node id; an ext_proc
        replica's workers each name a node of their own, which nothing else reads; a peer of
        no role, none."""
        return self.role is Role.EXT_PROC or (self.role is Role.EDGE and node_id == self.name)

    def fields(self) -> dict[str, str]:
        return {
            "peer": self.address,
            "role": self.role.value if self.role else "none",
            "peer_name": self.name,
        }


def nothing(_type_url: str) -> bool:
    """A stream's permissions before its peer is known."""
    return False


def peer_of(address: str, auth_context: Mapping[str, Sequence[bytes]],
            revocations: Revocations = NOTHING_REVOKED) -> Peer:
    """The peer as its certificate (auth_context()["x509_pem_cert"]) names it."""
    peer = certified_peer(peer_certificate(auth_context))
    if peer is None:
        return Peer(address, None)
    return Peer(address, peer.role, peer.name, serial=peer.serial, revocations=revocations)


def peer_from(context: grpc.aio.ServicerContext,
              revocations: Revocations = NOTHING_REVOKED) -> Peer:
    """The peer of a gRPC stream, as its certificate names it, checked against `revocations`
    whenever Peer.revoked is asked."""
    return peer_of(context.peer(), context.auth_context(), revocations)


async def refuse_revoked(context: grpc.aio.ServicerContext, peer: Peer, asked: str) -> None:
    """Refuse the RPC (raises) when the fleet's CRL revokes `peer`'s certificate now."""
    if peer.revoked():
        await refuse(context, peer, asked, grpc.StatusCode.UNAUTHENTICATED, REVOKED)


async def refuse(
    context: grpc.aio.ServicerContext, peer: Peer, asked: str, code: grpc.StatusCode, why: str
) -> None:
    """Log the refusal and end the RPC (raises, as context.abort does)."""
    log.warning("peer_refused", extra={**peer.fields(), "asked": asked, "reason": why})
    await context.abort(code, f"{why} ({asked})")


Admit = Callable[[grpc.aio.ServicerContext, str], Awaitable[Peer]]
"""Checks a telemetry stream's peer before anything is read from it (refuses by raising)."""


async def require_edge(context: grpc.aio.ServicerContext, asked: str,
                       revocations: Revocations = NOTHING_REVOKED) -> Peer:
    """The peer, if it is an edge Envoy whose certificate is not revoked; otherwise refuse the
    RPC (for ALS and LRS streams)."""
    peer = peer_from(context, revocations)
    await refuse_revoked(context, peer, asked)
    if peer.role is not Role.EDGE:
        code = grpc.StatusCode.UNAUTHENTICATED if peer.role is None else (
            grpc.StatusCode.PERMISSION_DENIED
        )
        await refuse(context, peer, asked, code, "only edge Envoys may send this")
    return peer


NODE_NOT_CERTIFIED = "the node id is not the name in the certificate"


async def refuse_other_node(context: grpc.aio.ServicerContext, peer: Peer, node_id: str,
                            asked: str) -> None:
    """Refuse the RPC (raises) when `peer` may not call itself `node_id`."""
    if not peer.may_be(node_id):
        await refuse(context, peer, f"node {node_id!r}: {asked}",
                     grpc.StatusCode.PERMISSION_DENIED, NODE_NOT_CERTIFIED)
