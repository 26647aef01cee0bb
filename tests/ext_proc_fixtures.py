"""ext_proc test material: policy/health protos, ProcessingRequest factories, a fake ADS."""

from __future__ import annotations

import functools
import queue
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Self

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from control_plane.policy.load import default_policy_path, load_policy_file
from control_plane.policy.wire import to_routing_policy
from ext_proc import healthcheck
from ext_proc.xds_client import REVOCATION_TYPE_URL
from gpu_router import pki
from gpu_router.api.v1 import health_pb2, revocation_pb2, routing_pb2
from gpu_router.fleet_certs import fleet
from gpu_router.grpc_tls import channel_credentials, server_credentials
from gpu_router.processes import free_port

POLICY_TYPE_URL = "type.googleapis.com/gpu_router.api.v1.RoutingPolicy"
HEALTH_TYPE_URL = "type.googleapis.com/gpu_router.api.v1.HealthSnapshot"
REQUEST_NAMESPACE = "gpu_router.request"


def offering(
    model: str, pmid: str, gpu: str, price_in: float, price_out: float
) -> routing_pb2.Offering:
    return routing_pb2.Offering(
        model=model,
        provider_model_id=pmid,
        gpu=gpu,
        input_usd_per_mtok=price_in,
        output_usd_per_mtok=price_out,
    )


def default_policy(version: str = "v1") -> routing_pb2.RoutingPolicy:
    """The embedded default policy (control_plane/policy/default.yaml), as the wire carries it:
    loaded and translated like the control plane does, so it cannot drift from the file."""
    policy = to_routing_policy(load_policy_file(default_policy_path()))
    policy.version = version
    return policy


def health_entry(
    provider: str,
    model: str = "",
    latency_ms: float | None = None,
    state: int = health_pb2.HEALTHY,
    cooldown_until_unix_ms: int = 0,
) -> health_pb2.ProviderHealth:
    return health_pb2.ProviderHealth(
        provider=provider,
        model=model,
        ewma_latency_ms=latency_ms or 0.0,
        samples=0 if latency_ms is None else 10,
        state=state,
        cooldown_until_unix_ms=cooldown_until_unix_ms,
    )


def snapshot(*entries: health_pb2.ProviderHealth) -> health_pb2.HealthSnapshot:
    return health_pb2.HealthSnapshot(
        entries=list(entries), generated_at_unix_ms=int(time.time() * 1000)
    )


def headers_request(
    path: str = "/v1/chat/completions",
    method: str = "POST",
    *,
    end_of_stream: bool = False,
    body_fields: Mapping[str, object] | None = None,
    **headers: str,
) -> ext_proc_pb2.ProcessingRequest:
    """Request headers as Envoy sends them (raw_value bytes); kwargs are headers, '_' -> '-'.

    `body_fields` is what Envoy's request-fields filter read from the body, forwarded in
    metadata_context under gpu_router.request (None: the filter wrote nothing).
    """
    pairs = {
        ":path": path,
        ":method": method,
        ":authority": "gpu-router",
        ":scheme": "http",
        **{k.replace("_", "-"): v for k, v in headers.items()},
    }
    request = ext_proc_pb2.ProcessingRequest(
        request_headers=ext_proc_pb2.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()
                ]
            ),
            end_of_stream=end_of_stream,
        )
    )
    if body_fields is not None:
        request.metadata_context.filter_metadata[REQUEST_NAMESPACE].update(body_fields)
    return request


def body_request(body: bytes, *, end_of_stream: bool = True) -> ext_proc_pb2.ProcessingRequest:
    return ext_proc_pb2.ProcessingRequest(
        request_body=ext_proc_pb2.HttpBody(body=body, end_of_stream=end_of_stream)
    )


def packed(message: Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


@functools.cache
def test_certs() -> dict[str, pki.TlsFiles]:
    """One CA for every FakeAds of the session (a restarted one must be trusted as before)."""
    directory = Path(tempfile.mkdtemp(prefix="gpu-router-test-certs-"))
    return pki.ensure(directory, fleet(["edge-test"], ["ext-proc-test"]))


def edge_channel(target: str) -> grpc.Channel:
    """A channel to an ext_proc replica started with FakeAds.client_flags(), as an edge Envoy
    (the only role ext_proc decides for) presents itself: mutual TLS, the edge certificate."""
    return healthcheck.channel(target, test_certs()["edge-test"])


class FakeAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """A tiny state-of-the-world ADS server for ext_proc tests (threads, not asyncio).

    Serves the latest `publish`ed resource per type to every stream that
    subscribed to it and records every DiscoveryRequest it receives.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.requests: list[discovery_pb2.DiscoveryRequest] = []
        self.peers: list[bytes | None] = []
        """Each stream's client certificate (PEM), in the order the streams opened."""
        # As the control plane, which always has a CRL to send (empty without one): a replica
        # serves only once it holds one.
        self._resources: dict[str, tuple[str, list[any_pb2.Any]]] = {
            REVOCATION_TYPE_URL: ("crl-0", [packed(revocation_pb2.RevocationList())])}
        self._streams: list[
            tuple[set[str], queue.Queue[discovery_pb2.DiscoveryResponse | None]]
        ] = []
        self._lock = threading.Lock()
        self._nonce = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, self._server)
        self._server.add_secure_port(
            f"127.0.0.1:{self.port}",
            server_credentials(test_certs()[pki.Role.CONTROL_PLANE.value]),
        )

    def __enter__(self) -> Self:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        with self._lock:
            for _, out in self._streams:
                out.put(None)
        self._server.stop(grace=None).wait()

    @staticmethod
    def client_files() -> pki.TlsFiles:
        return test_certs()["ext-proc-test"]

    @classmethod
    def client_flags(cls) -> list[str]:
        """ext_proc's TLS flags for this server."""
        files = cls.client_files()
        return ["--tls-ca", str(files.ca), "--tls-cert", str(files.cert),
                "--tls-key", str(files.key)]

    @classmethod
    def client_credentials(cls) -> grpc.ChannelCredentials:
        return channel_credentials(cls.client_files())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _response(self, type_url: str) -> discovery_pb2.DiscoveryResponse:
        self._nonce += 1
        version, resources = self._resources[type_url]
        return discovery_pb2.DiscoveryResponse(
            type_url=type_url, version_info=version, resources=resources, nonce=str(self._nonce)
        )

    def publish(self, type_url: str, version: str, *resources: Message | any_pb2.Any) -> None:
        """Make `resources` the current state of `type_url` and push it to subscribed streams."""
        with self._lock:
            self._resources[type_url] = (
                version,
                [r if isinstance(r, any_pb2.Any) else packed(r) for r in resources],
            )
            for subscribed, out in self._streams:
                if type_url in subscribed:
                    out.put(self._response(type_url))

    def StreamAggregatedResources(
        self,
        request_iterator: Iterator[discovery_pb2.DiscoveryRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[discovery_pb2.DiscoveryResponse]:
        subscribed: set[str] = set()
        out: queue.Queue[discovery_pb2.DiscoveryResponse | None] = queue.Queue()
        with self._lock:
            self._streams.append((subscribed, out))
            self.peers.append(pki.peer_certificate(context.auth_context()))

        def read() -> None:
            try:
                for request in request_iterator:
                    with self._lock:
                        self.requests.append(request)
                        if request.type_url not in subscribed:
                            subscribed.add(request.type_url)
                            if request.type_url in self._resources:
                                out.put(self._response(request.type_url))
            except grpc.RpcError:
                pass
            out.put(None)

        threading.Thread(target=read, daemon=True).start()
        try:
            while (response := out.get()) is not None:
                yield response
        finally:
            with self._lock:
                self._streams.remove((subscribed, out))

    def requests_for(self, type_url: str) -> list[discovery_pb2.DiscoveryRequest]:
        with self._lock:
            return [r for r in self.requests if r.type_url == type_url]
