"""The grpc.aio ExternalProcessor service: adapts Envoy's stream to RequestPhases."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2

from ext_proc.admission import Admission, tag_client
from ext_proc.rate_limit import LocalCounters, RateLimiter
from ext_proc.request import NotReadyError, ProtocolError, RequestPhases
from ext_proc.router_state import LiveState
from ext_proc.scoring import NOBODY_AT_CAP
from gpu_router.pki import CertifiedPeer, Role, certified_peer, peer_certificate
from gpu_router.revocation import NOTHING_REVOKED, REVOKED, Revocations

_log = logging.getLogger(__name__)


def _refusal(peer: CertifiedPeer | None, revocations: Revocations) -> str | None:
    """Why the stream's peer, as its certificate names it by the control plane's rule
    (pki.certified_peer: URI SANs only), may not ask for decisions; None when it may. The port
    takes only certificates of the fleet's CA (workers.py); of those, only an edge Envoy's
    that the fleet's CRL does not revoke. ~10 us a stream (gRPC's auth context, then a cache
    hit; peer_identities() took ~4 but also lists DNS SANs and the CN)."""
    if peer is None or peer.role is not Role.EDGE:
        return _EDGES_ONLY
    return REVOKED if revocations.revoked(peer.serial) else None


_EDGES_ONLY = "only an edge Envoy's certificate may ask ext_proc for decisions"
_NO_REQUEST = "the stream ended before its request headers"


class ExternalProcessorService:
    """One stream per HTTP request; each stream decides on the state current when it opened."""

    def __init__(self, live: LiveState, admission: Admission | None = None,
                 revocations: Revocations = NOTHING_REVOKED) -> None:
        self._live = live
        self._admission = admission or Admission(RateLimiter(LocalCounters()))
        self._revocations = revocations

    async def Process(
        self,
        request_iterator: AsyncIterator[ext_proc_pb2.ProcessingRequest],
        context: grpc.aio.ServicerContext,
    ) -> ext_proc_pb2.ProcessingResponse:
        """Read the request headers, return one answer, and so end the stream: by its
        processing mode Envoy sends nothing more, so a read for the end would only wait for
        Envoy's reset of the stream (it cost the fixed-answer floor ~30 us of its ~300 a
        stream). Served as stream-unary (add_to_server). context.read() rather than iterating
        `request_iterator`: the floor spent ~7% less CPU per stream that way (658 -> 613 us,
        loaded in turn), and grpc.aio's per-stream machinery is most of a decision's cost."""
        peer = certified_peer(peer_certificate(context.auth_context()))
        refusal = _refusal(peer, self._revocations)
        if refusal is not None:
            # The control plane's fields (xds/peer.py Peer.fields), beside the names the
            # certificate carries (which the rule distrusts).
            _log.warning("peer_refused", extra={
                "peer": context.peer(),
                "role": "none" if peer is None else peer.role.value,
                "peer_name": "" if peer is None else peer.name,
                "reason": refusal,
                "identities": _names(context.peer_identities())})
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
        assert peer is not None  # context.abort raised otherwise
        state = self._live.current
        phases = RequestPhases(state, full=state.health.at_cap.get(peer.name, NOBODY_AT_CAP))
        request = await context.read()
        if request is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, _NO_REQUEST)
        admitted = await self._admission.admit(state, request)
        if isinstance(admitted, ext_proc_pb2.ProcessingResponse):
            return admitted  # refused by the client gate (key, budget, rate limit)
        phases.client = admitted
        response = await _answer(phases, request, context)
        if admitted is not None:
            tag_client(response, admitted)
        return response


ProcessHandler = Callable[
    [AsyncIterator[ext_proc_pb2.ProcessingRequest], grpc.aio.ServicerContext],
    Awaitable[ext_proc_pb2.ProcessingResponse],
]
_SERVICE = ext_proc_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name


def add_to_server(process: ProcessHandler, server: grpc.aio.Server) -> None:
    """Serves `process` as Envoy's ExternalProcessor's Process, registered as stream-unary:
    on the wire a stream-stream call that sends one answer and ends is the same, but grpc.aio
    sends a unary answer and the stream's status in one batch where a streamed one takes two.
    The fixed-answer floor spent ~11% less ext_proc CPU per request that way (400 -> 356 and
    548 -> 491 us, two runs loaded in turn)."""
    handlers = {"Process": grpc.stream_unary_rpc_method_handler(
        process,
        request_deserializer=ext_proc_pb2.ProcessingRequest.FromString,
        response_serializer=ext_proc_pb2.ProcessingResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_registered_method_handlers(_SERVICE, handlers)


async def _answer(phases: RequestPhases, request: ext_proc_pb2.ProcessingRequest,
                  context: grpc.aio.ServicerContext) -> ext_proc_pb2.ProcessingResponse:
    """The phase's answer; a stream that cannot have one is failed with the reason."""
    try:
        return phases.handle(request)
    except NotReadyError as error:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
    except ProtocolError as error:
        _log.warning("ext_proc protocol error", extra={"error": str(error)})
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
    raise AssertionError("unreachable: context.abort raises")


def _names(identities: list[bytes] | None) -> list[str]:
    return [i.decode("utf-8", "replace") for i in identities or ()]
