"""Envoy's gRPC access-log service (envoy.service.accesslog.v3), feeding FleetHealth.

Every Envoy edge streams its access log here ("gpu-router.xds" cluster, log name
"gpu-router.edge"); each HTTP entry that reached a provider becomes a RequestSample.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from control_plane.telemetry.health import FleetHealth
from control_plane.telemetry.samples import sample_from_log_entry

logger = logging.getLogger(__name__)


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):
    """Turns streamed access-log entries into health samples.

    Samples are stamped with this process's clock on arrival, not with the Envoy host's,
    so that the health windows of many edges line up (Envoy flushes every 100 ms, so the
    arrival time is the request's end time to within that).
    """

    def __init__(self, fleet: FleetHealth, clock: Callable[[], float] = time.time) -> None:
        self._fleet = fleet
        self._clock = clock

    def register(self, server: grpc.aio.Server) -> None:
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self, server)

    async def StreamAccessLogs(  # noqa: N802 - the gRPC method name
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        # As the ALS API says, the identifier is sent in the first message of a stream only.
        node_id = ""
        recorded = 0
        async for message in request_iterator:
            if message.HasField("identifier"):
                node_id = message.identifier.node.id
                logger.info(
                    "access log stream opened",
                    extra={"node": node_id, "log_name": message.identifier.log_name},
                )
            if not message.HasField("http_logs"):
                continue
            now_ms = int(self._clock() * 1000)
            for entry in message.http_logs.log_entry:
                sample = sample_from_log_entry(entry, node_id, at_unix_ms=now_ms)
                if sample is not None:
                    self._fleet.record(sample)
                    recorded += 1
        logger.info("access log stream closed", extra={"node": node_id, "samples": recorded})
        return als_pb2.StreamAccessLogsResponse()
