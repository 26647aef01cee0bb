"""grpc.health.v1 for Envoy's active health check of the ext_proc cluster.

A worker reports SERVING only once it holds a routing policy (before that every stream would
fail) and the fleet's CRL (before that it could not refuse a revoked edge), and NOT_SERVING
from the moment it starts shutting down. Envoy checks each replica every few hundred
milliseconds: a frozen or overloaded replica misses its checks and is marked unhealthy, and
with no healthy replica Envoy fails ext_proc streams at once, so requests go to the fallback
route without waiting out the message timeout. The health check never depends on the control
plane: a worker keeps serving on its last policy while the control plane is away.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ext_proc.healthcheck import EXT_PROC_SERVICE
from ext_proc.router_state import LiveState

SERVICES = ("", EXT_PROC_SERVICE)
"""The server as a whole ("") and the ExternalProcessor service: both report the same."""

_Status = health_pb2.HealthCheckResponse.ServingStatus


class ServingStatus:
    """The health servicer of one worker, NOT_SERVING until its first routing policy."""

    def __init__(self) -> None:
        self._servicer = health.aio.HealthServicer()

    async def add_to(self, server: grpc.aio.Server) -> None:
        """Register on `server` (before it starts), reporting NOT_SERVING."""
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    async def serve_once_routable(self, live: LiveState) -> None:
        """Report SERVING once `live` holds a routing policy and the fleet's CRL (a worker
        never loses them again)."""
        await live.routable.wait()
        await self._set(health_pb2.HealthCheckResponse.SERVING)

    async def shutting_down(self) -> None:
        """NOT_SERVING for good: Envoy stops sending new streams during the shutdown grace."""
        await self._servicer.enter_graceful_shutdown()

    async def _set(self, status: _Status) -> None:
        for service in SERVICES:
            await self._servicer.set(service, status)
