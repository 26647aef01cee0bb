"""ext_proc's ADS client: learns the fleet's CRL, the RoutingPolicy, the HealthSnapshot and
what clients spent, like Envoy learns clusters.

State of the world over envoy.service.discovery.v3.AggregatedDiscoveryService.
`Subscriptions` is the pure per-stream logic (what to request, how to answer a
response); `AdsClient` is the asyncio shell that keeps a stream open and
reconnects with exponential backoff, keeping the last good state meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from ext_proc.router_state import LiveState
from gpu_router.api.v1 import clients_pb2, health_pb2, revocation_pb2, routing_pb2
from gpu_router.revocation import RevocationError, Revocations

POLICY_TYPE_URL = "type.googleapis.com/gpu_router.api.v1.RoutingPolicy"
HEALTH_TYPE_URL = "type.googleapis.com/gpu_router.api.v1.HealthSnapshot"
CLIENT_SPEND_TYPE_URL = "type.googleapis.com/gpu_router.api.v1.ClientSpendSnapshot"
REVOCATION_TYPE_URL = "type.googleapis.com/gpu_router.api.v1.RevocationList"
POLICY_RESOURCE = "default"
HEALTH_RESOURCE = "fleet"
CLIENT_SPEND_RESOURCE = "clients"
REVOCATION_RESOURCE = "crl"
NODE_CLUSTER = "gpu-router-ext-proc"
_RESOURCE_WRAPPER_URL = "type.googleapis.com/envoy.service.discovery.v3.Resource"
_INVALID_ARGUMENT = 3  # google.rpc.Code

_log = logging.getLogger(__name__)


def node_identity() -> base_pb2.Node:
    """This replica as the control plane sees it: one node per worker process."""
    return base_pb2.Node(
        id=f"ext-proc-{socket.gethostname()}-{os.getpid()}",
        cluster=NODE_CLUSTER,
        user_agent_name="gpu-router-ext-proc",
    )


class ResourceError(ValueError):
    """A response whose resource cannot be used (it is NACKed)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscription:
    """One resource type ext_proc watches."""

    type_url: str
    resource_name: str
    message: type[Message]
    apply: Callable[[Message], None]
    """Builds and swaps in the new state; raises ValueError (NACK) when the resource is unusable."""


@dataclass(slots=True, kw_only=True)
class TypeState:
    version: str = ""
    """Last ACKed version_info (sent again on reconnect)."""
    nonce: str = ""
    """Nonce of the last response seen."""


def learn_crl(revocations: Revocations, applied: Callable[[], None]
              ) -> Callable[[revocation_pb2.RevocationList], None]:
    """Applies a RevocationList, then calls `applied`; a CRL that is not the fleet CA's is
    NACKed (ResourceError)."""
    def apply(message: revocation_pb2.RevocationList) -> None:
        try:
            if revocations.learn(message.crl_pem):
                _log.info("crl_learned", extra={"bytes": len(message.crl_pem)})
        except RevocationError as error:
            raise ResourceError(str(error)) from error
        applied()
    return apply


def live_subscriptions(live: LiveState, revocations: Revocations) -> tuple[Subscription, ...]:
    """What a worker watches; the CRL first, so its first answer is read before a policy's."""
    return (
        Subscription(
            type_url=REVOCATION_TYPE_URL,
            resource_name=REVOCATION_RESOURCE,
            message=revocation_pb2.RevocationList,
            apply=learn_crl(revocations, live.crl_applied),
        ),  # type: ignore[arg-type]
        Subscription(
            type_url=POLICY_TYPE_URL,
            resource_name=POLICY_RESOURCE,
            message=routing_pb2.RoutingPolicy,
            apply=live.apply_policy,
        ),  # type: ignore[arg-type]
        Subscription(
            type_url=HEALTH_TYPE_URL,
            resource_name=HEALTH_RESOURCE,
            message=health_pb2.HealthSnapshot,
            apply=live.apply_health,
        ),  # type: ignore[arg-type]
        Subscription(
            type_url=CLIENT_SPEND_TYPE_URL,
            resource_name=CLIENT_SPEND_RESOURCE,
            message=clients_pb2.ClientSpendSnapshot,
            apply=live.apply_spend,
        ),  # type: ignore[arg-type]
    )


def _unpack(subscription: Subscription, resources: list[any_pb2.Any]) -> Message | None:
    """The subscribed resource from a response (bare or wrapped in a discovery Resource)."""
    found: list[any_pb2.Any] = []
    for item in resources:
        if item.type_url == _RESOURCE_WRAPPER_URL:
            wrapper = discovery_pb2.Resource()
            item.Unpack(wrapper)
            if wrapper.name == subscription.resource_name and wrapper.HasField("resource"):
                found.append(wrapper.resource)
        else:
            found.append(item)
    if not found:
        return None
    if len(found) > 1:
        raise ResourceError(
            f"{len(found)} resources for {subscription.resource_name!r}, expected one"
        )
    if found[0].type_url != subscription.type_url:
        raise ResourceError(
            f"resource of type {found[0].type_url}, expected {subscription.type_url}"
        )
    message = subscription.message()
    try:
        found[0].Unpack(message)
    except DecodeError as error:
        raise ResourceError(f"cannot decode {subscription.type_url}: {error}") from error
    return message


class Subscriptions:
    """Pure per-stream xDS logic: initial requests, then one ACK or NACK per response."""

    def __init__(self, node: base_pb2.Node, subscriptions: tuple[Subscription, ...]) -> None:
        self._node = node
        self._subscriptions: Mapping[str, Subscription] = {s.type_url: s for s in subscriptions}
        self.states = {s.type_url: TypeState() for s in subscriptions}

    def initial_requests(self) -> list[discovery_pb2.DiscoveryRequest]:
        """One request per type, carrying the last ACKed version so a reconnect resumes."""
        self.states = {url: TypeState(version=state.version) for url, state in self.states.items()}
        return [
            discovery_pb2.DiscoveryRequest(
                node=self._node,
                type_url=url,
                resource_names=[s.resource_name],
                version_info=self.states[url].version,
            )
            for url, s in self._subscriptions.items()
        ]

    def on_response(
        self, response: discovery_pb2.DiscoveryResponse
    ) -> discovery_pb2.DiscoveryRequest:
        """Apply the response, and answer it: an ACK, or a NACK keeping the last good version."""
        subscription = self._subscriptions.get(response.type_url)
        if subscription is None:
            return discovery_pb2.DiscoveryRequest(
                type_url=response.type_url,
                response_nonce=response.nonce,
                error_detail=status_pb2.Status(
                    code=_INVALID_ARGUMENT, message="type not subscribed"
                ),
            )
        state = self.states[response.type_url]
        state.nonce = response.nonce
        request = discovery_pb2.DiscoveryRequest(
            type_url=response.type_url,
            resource_names=[subscription.resource_name],
            response_nonce=response.nonce,
        )
        try:
            message = _unpack(subscription, list(response.resources))
            if message is None:
                _log.warning(
                    "xds response without our resource; keeping the last state",
                    extra={"type_url": response.type_url, "version": response.version_info},
                )
            else:
                subscription.apply(message)
                _log.info(
                    "xds resource applied",
                    extra={"type_url": response.type_url, "version": response.version_info},
                )
        except ValueError as error:  # ResourceError and RoutingTableError
            _log.warning(
                "xds NACK",
                extra={
                    "type_url": response.type_url,
                    "version": response.version_info,
                    "error": str(error),
                },
            )
            request.version_info = state.version
            request.error_detail.CopyFrom(
                status_pb2.Status(code=_INVALID_ARGUMENT, message=str(error))
            )
            return request
        state.version = request.version_info = response.version_info
        return request


class AdsClient:
    """Keeps one ADS stream to the control plane open; reconnects with capped backoff."""

    def __init__(
        self,
        target: str,
        subscriptions: Subscriptions,
        *,
        credentials: Callable[[], grpc.ChannelCredentials],
        min_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
    ) -> None:
        """`credentials` is called for each channel: a stream that failed reconnects over a new
        channel with the TLS files as they are then (a renewed certificate without a restart;
        grpc_tls.py)."""
        self._target = target
        self._credentials = credentials
        self._subscriptions = subscriptions
        self._min_backoff = min_backoff_s
        self._max_backoff = max_backoff_s
        self._responded = False

    async def run(self) -> None:
        """Until cancelled. A stream that carried a response resets the backoff."""
        backoff = self._min_backoff
        while True:
            self._responded = False
            try:
                async with grpc.aio.secure_channel(self._target, self._credentials()) as channel:
                    await self._stream(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel))
                _log.warning(
                    "xds stream closed by the control plane", extra={"target": self._target}
                )
            except grpc.aio.AioRpcError as error:
                _log.warning(
                    "xds stream failed",
                    extra={
                        "target": self._target,
                        "code": error.code().name,
                        "retry_in_s": backoff,
                    },
                )
            except OSError as error:  # a TLS file being replaced: the next try reads it again
                _log.warning("xds credentials unreadable",
                             extra={"error": str(error), "retry_in_s": backoff})
            if self._responded:
                backoff = self._min_backoff
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _stream(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub) -> None:
        call = stub.StreamAggregatedResources()
        try:
            for request in self._subscriptions.initial_requests():
                await call.write(request)
            while (response := await call.read()) is not grpc.aio.EOF:
                self._responded = True
                await call.write(self._subscriptions.on_response(response))
        finally:
            call.cancel()
