"""The state-of-the-world xDS protocol for one ADS stream, as a pure state machine.

No gRPC and no clock here: the server feeds in requests (`receive`) and asks what to send
for the current snapshot (`responses`); everything the protocol says about nonces,
ACK/NACK, subscriptions and ordering lives in this one class, so it tests without sockets.

Rules followed (envoy/api/xds_protocol.rst, "ACK/NACK and resource type instance version"):
- the first request of a type subscribes; an empty resource list means wildcard for the
  types that allow it (LDS, CDS and ours);
- a request whose response_nonce is the last nonce sent is an ACK, or a NACK when it
  carries error_detail; any other nonce is stale (a response is in flight) and ignored,
  because the request that answers that response will carry the full subscription again;
- after a NACK the type is parked: the rejected version is never re-sent to that stream,
  only a different version (or a different subscription) is;
- LDS and CDS responses carry the full set (a resource left out is deleted); EDS, RDS
  and SDS carry the subscribed names that exist; after every CDS response EDS is re-sent,
  since an updated cluster warms until it receives its endpoints again.

Each node is served its own view of the snapshot (node.py); versions recorded here are the
ones on the wire, i.e. that view's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from google.protobuf import any_pb2

from control_plane.xds import type_urls
from control_plane.xds.node import Node, node_resources
from control_plane.xds.snapshot import Snapshot, TypeResources


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """The parts of a DiscoveryRequest the protocol reads."""

    type_url: str
    version_info: str = ""
    """The last version the client accepted for this type ("" before any)."""
    resource_names: tuple[str, ...] = ()
    response_nonce: str = ""
    error_message: str | None = None
    """error_detail.message when error_detail is set (a NACK), else None."""
    node: Node | None = None
    """Only required on the first request of a stream."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    """One DiscoveryResponse to send."""

    type_url: str
    version: str
    nonce: str
    resources: tuple[any_pb2.Any, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribed:
    """The client subscribed to a type, or changed the names it wants."""

    type_url: str
    names: tuple[str, ...]
    """Sorted; empty when wildcard."""
    wildcard: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Acked:
    type_url: str
    version: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Nacked:
    type_url: str
    version: str
    """The rejected version (the one sent with the nonce the NACK answers)."""
    kept_version: str
    """The last version the client ACKed, which it keeps running."""
    error: str
    """The client's error_detail.message."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StaleNonce:
    """A request answering an older response; ignored."""

    type_url: str
    nonce: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Forbidden:
    """A request for a type this stream's peer may not have (control_plane/xds/peer.py):
    nothing is subscribed, and nothing of that type is ever sent on the stream."""

    type_url: str
    names: tuple[str, ...]


Event = Subscribed | Acked | Nacked | StaleNonce | Forbidden


@dataclass(slots=True, kw_only=True)
class TypeState:
    """Where one resource type stands on one stream."""

    wildcard: bool
    names: frozenset[str]
    """Subscribed names; empty when wildcard."""
    sent_version: str = ""
    sent_names: frozenset[str] | None = None
    """The subscription the last response answered (None before any response)."""
    nonce: str = ""
    """Nonce of the last response sent; "" before any."""
    answered: bool = False
    """The client already ACKed or NACKed that nonce (later requests with it only resubscribe)."""
    acked_version: str = ""
    acked_names: frozenset[str] = frozenset()
    """Names the ACKed response answered (empty for wildcard: it carried everything)."""
    responses_sent: int = 0
    nacked_version: str = ""
    """Most recently rejected version ("" if never)."""
    last_error: str = ""
    """The client's message for that rejection."""
    parked_on: tuple[str, frozenset[str]] | None = None
    """(version, names) the client rejected: not sent again until either differs."""
    resend: bool = False
    """Send even if unchanged (EDS after a CDS response)."""


class XdsStream:
    """Protocol state of one ADS stream: one TypeState per type URL the client asked for."""

    def __init__(self, allowed: Callable[[str], bool] = lambda _type_url: True) -> None:
        self.allowed = allowed
        """Whether this stream may subscribe to and be sent a type; the server narrows it to
        the peer's role."""
        self.node: Node | None = None
        self.types: dict[str, TypeState] = {}
        self._nonces: Iterator[int] = itertools.count(1)
        self._views: dict[str, tuple[TypeResources, TypeResources]] = {}
        """type URL -> (snapshot entry, this node's view of it), the last one computed."""

    def acked_version(self, type_url: str) -> str:
        state = self.types.get(type_url)
        return state.acked_version if state is not None else ""

    def acked_covers(self, type_url: str, names: frozenset[str]) -> bool:
        """Whether the last ACKed response of the type carried every one of `names`."""
        state = self.types.get(type_url)
        return state is not None and (state.wildcard or names <= state.acked_names)

    def receive(self, request: Request) -> list[Event]:
        """Apply one DiscoveryRequest; what it meant, in order."""
        if self.node is None and request.node is not None:
            self.node = request.node
        if not self.allowed(request.type_url):
            return [Forbidden(type_url=request.type_url, names=request.resource_names)]
        wildcard, names = _subscription(request.type_url, request.resource_names)
        state = self.types.get(request.type_url)
        if state is None:
            self.types[request.type_url] = TypeState(
                wildcard=wildcard, names=names, acked_version=request.version_info
            )
            return [
                Subscribed(type_url=request.type_url, names=tuple(sorted(names)), wildcard=wildcard)
            ]
        if request.response_nonce != state.nonce:
            return [StaleNonce(type_url=request.type_url, nonce=request.response_nonce)]
        events: list[Event] = []
        if state.nonce and not state.answered:
            state.answered = True
            events.append(_answer(request, state))
        if (wildcard, names) != (state.wildcard, state.names):
            state.wildcard, state.names = wildcard, names
            events.append(
                Subscribed(type_url=request.type_url, names=tuple(sorted(names)), wildcard=wildcard)
            )
        return events

    def responses(self, snapshot: Snapshot) -> list[Response]:
        """Responses the client needs to match `snapshot`, in send order; marks them sent."""
        out: list[Response] = []
        for type_url in sorted(self.types, key=type_urls.send_rank):
            if not self.allowed(type_url):
                continue
            state = self.types[type_url]
            response = self._response(type_url, state, snapshot)
            if response is None:
                continue
            out.append(response)
            for dependent, trigger in type_urls.RESENT_AFTER.items():
                if trigger == type_url and dependent in self.types:
                    self.types[dependent].resend = True
        return out

    def view(self, type_url: str, snapshot: Snapshot) -> TypeResources | None:
        """This node's resources and version of one type (None: never published)."""
        entry = snapshot.types.get(type_url)
        if entry is None:
            return None
        cached = self._views.get(type_url)
        if cached is not None and cached[0] is entry:
            return cached[1]
        view = node_resources(self.node, type_url, entry)
        self._views[type_url] = (entry, view)
        return view

    def _response(self, type_url: str, state: TypeState, snapshot: Snapshot) -> Response | None:
        entry = self.view(type_url, snapshot)
        if entry is None:
            return None
        available = entry.resources
        if state.wildcard:
            chosen = [available[name] for name in sorted(available)]
        else:
            chosen = [available[name] for name in sorted(state.names) if name in available]
            if not chosen:
                return None
        version = entry.version
        if state.parked_on == (version, state.names):
            return None
        state.parked_on = None
        if version == state.sent_version and state.names == state.sent_names and not state.resend:
            return None
        state.sent_version, state.sent_names, state.resend = version, state.names, False
        state.nonce, state.answered = str(next(self._nonces)), False
        state.responses_sent += 1
        return Response(
            type_url=type_url, version=version, nonce=state.nonce, resources=tuple(chosen)
        )


def _answer(request: Request, state: TypeState) -> Acked | Nacked:
    """The ACK or NACK of the last response sent for this type."""
    if request.error_message is None:
        state.acked_version, state.acked_names = state.sent_version, state.sent_names or frozenset()
        return Acked(type_url=request.type_url, version=state.sent_version)
    state.nacked_version, state.last_error = state.sent_version, request.error_message
    state.parked_on = (state.sent_version, state.sent_names or frozenset())
    return Nacked(
        type_url=request.type_url,
        version=state.sent_version,
        kept_version=state.acked_version,
        error=request.error_message,
    )


def _subscription(type_url: str, names: Sequence[str]) -> tuple[bool, frozenset[str]]:
    """(wildcard, names): empty or "*" means every resource, for the types that allow it."""
    if type_url in type_urls.WILDCARD_TYPES and (not names or "*" in names):
        return True, frozenset()
    return False, frozenset(names)
