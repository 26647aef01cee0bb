"""The gRPC adapter: AggregatedDiscoveryService streams driven by XdsStream and SnapshotCache.

All protocol decisions are in stream.py; this module only converts protobufs, merges the
two inputs of a stream (client requests and snapshot changes) into one queue, and logs.
Who may have what is decided here, once per stream, on its first request: the peer's role
from its certificate (peer.py) must match the node cluster it claims, and narrows the stream
to that role's types, so an ext_proc replica or a stranger never receives a Secret.
Delta xDS is not served (the base servicer answers UNIMPLEMENTED): Envoy's bootstrap here
uses state-of-the-world ADS (api_type GRPC), as do our ext_proc replicas.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from control_plane.xds.cache import SnapshotCache
from control_plane.xds.node import (
    NodeMetadataError,
    edge_port_from_metadata,
    secrets_dir_from_metadata,
)
from control_plane.xds.peer import (
    NODE_CLUSTERS,
    Peer,
    nothing,
    peer_from,
    refuse,
    refuse_other_node,
    refuse_revoked,
)
from control_plane.xds.stream import (
    Acked,
    Event,
    Forbidden,
    Nacked,
    Node,
    Request,
    Response,
    StaleNonce,
    Subscribed,
    XdsStream,
)
from gpu_router.revocation import NOTHING_REVOKED, Revocations

log = logging.getLogger(__name__)

CONTROL_PLANE = base_pb2.ControlPlane(identifier="gpu-router.control-plane")


Authenticate = Callable[[grpc.aio.ServicerContext, Node], Peer]
"""Who the peer of a stream is, given its first request's node."""


def peer_by_certificate(context: grpc.aio.ServicerContext, _node: Node,
                   revocations: Revocations = NOTHING_REVOKED) -> Peer:
    """The peer as its TLS client certificate names it; the node's claim is not evidence."""
    return peer_from(context, revocations)


class _Signal(enum.Enum):
    SNAPSHOT_CHANGED = enum.auto()
    CLIENT_DONE = enum.auto()


class AggregatedDiscoveryServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """State-of-the-world ADS over one SnapshotCache, for Envoy nodes and ext_proc replicas."""

    def __init__(self, cache: SnapshotCache,
                 authenticate: Authenticate = peer_by_certificate) -> None:
        self._cache = cache
        self._authenticate = authenticate

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        stream = XdsStream(allowed=nothing)
        inbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | _Signal] = asyncio.Queue()
        peer = context.peer()
        self._cache.open_stream(stream, peer, lambda: inbox.put_nowait(_Signal.SNAPSHOT_CHANGED))
        reader = asyncio.create_task(_pump(request_iterator, inbox))
        admitted = Peer(peer, None)
        try:
            while (item := await inbox.get()) is not _Signal.CLIENT_DONE:
                if isinstance(item, discovery_pb2.DiscoveryRequest):
                    try:
                        request = _from_proto(item)
                    except NodeMetadataError as error:
                        log.warning("xds_node_rejected", extra={"peer": peer, "error": str(error)})
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
                    first = stream.node is None
                    if first:
                        admitted = await self._admit(stream, request, context)
                    for event in stream.receive(request):
                        _log_event(stream, event)
                        if isinstance(event, Forbidden):
                            await refuse(
                                context, admitted, event.type_url,
                                grpc.StatusCode.PERMISSION_DENIED, "type not served to this role",
                            )
                    if first and stream.node is not None:
                        log.info("xds_stream_open", extra={**_node_fields(stream), "peer": peer})
                    self._cache.note_acks()
                # A certificate revoked since the stream opened gets nothing more (keys least).
                await refuse_revoked(context, admitted, "xDS responses")
                for response in stream.responses(self._cache.snapshot):
                    yield _to_proto(response)
        finally:
            reader.cancel()
            self._cache.close_stream(stream)
            log.info("xds_stream_closed", extra={**_node_fields(stream), "peer": peer})

    async def _admit(
        self, stream: XdsStream, request: Request, context: grpc.aio.ServicerContext
    ) -> Peer:
        """Narrow a new stream to its peer's types, or refuse it (raises)."""
        asked = f"{request.type_url} {list(request.resource_names)}"
        if request.node is None:
            unnamed = Peer(context.peer(), None)
            await refuse(context, unnamed, asked,
                         grpc.StatusCode.INVALID_ARGUMENT, "the first request names no node")
            return unnamed
        peer = self._authenticate(context, request.node)
        await refuse_revoked(context, peer, asked)
        if peer.role is None:
            await refuse(context, peer, asked, grpc.StatusCode.UNAUTHENTICATED,
                         "no client certificate of a gpu-router role")
        elif NODE_CLUSTERS.get(peer.role) != request.node.cluster:
            await refuse(context, peer, f"node cluster {request.node.cluster!r}: {asked}",
                         grpc.StatusCode.PERMISSION_DENIED,
                         "the node cluster does not match the certificate's role")
        else:
            await refuse_other_node(context, peer, request.node.id, asked)
        stream.allowed = peer.may_have
        return peer


async def _pump(
    requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
    inbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | _Signal],
) -> None:
    """Move client requests into the stream's queue until the client half-closes or goes away."""
    try:
        async for message in requests:
            inbox.put_nowait(message)
    except grpc.RpcError as error:
        log.debug("xds_stream_read_failed", extra={"error": str(error)})
    finally:
        inbox.put_nowait(_Signal.CLIENT_DONE)


def _from_proto(message: discovery_pb2.DiscoveryRequest) -> Request:
    """Raises NodeMetadataError when the node's metadata asks for something unservable."""
    return Request(
        type_url=message.type_url,
        version_info=message.version_info,
        resource_names=tuple(message.resource_names),
        response_nonce=message.response_nonce,
        error_message=message.error_detail.message if message.HasField("error_detail") else None,
        node=Node(
            id=message.node.id,
            cluster=message.node.cluster,
            edge_port=edge_port_from_metadata(message.node.metadata),
            secrets_dir=secrets_dir_from_metadata(message.node.metadata),
        )
        if message.HasField("node")
        else None,
    )


def _to_proto(response: Response) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse(
        version_info=response.version,
        resources=response.resources,
        type_url=response.type_url,
        nonce=response.nonce,
        control_plane=CONTROL_PLANE,
    )


def _node_fields(stream: XdsStream) -> dict[str, str | int | None]:
    node = stream.node
    return {
        "node": node.id if node else "",
        "node_cluster": node.cluster if node else "",
        "edge_port": node.edge_port if node else None,
    }


def _log_event(stream: XdsStream, event: Event) -> None:
    match event:
        case Nacked():
            log.warning(
                "xds_nack",
                extra={
                    **_node_fields(stream),
                    "type_url": event.type_url,
                    "rejected_version": event.version,
                    "kept_version": event.kept_version,
                    "error": event.error,
                },
            )
        case Acked():
            log.debug(
                "xds_ack",
                extra={
                    **_node_fields(stream),
                    "type_url": event.type_url,
                    "version": event.version,
                },
            )
        case Subscribed():
            log.debug(
                "xds_subscribe",
                extra={
                    **_node_fields(stream),
                    "type_url": event.type_url,
                    "names": list(event.names),
                    "wildcard": event.wildcard,
                },
            )
        case StaleNonce():
            log.debug(
                "xds_stale_nonce",
                extra={**_node_fields(stream), "type_url": event.type_url, "nonce": event.nonce},
            )
