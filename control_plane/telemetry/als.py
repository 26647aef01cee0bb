"""Envoy's gRPC access-log service (envoy.service.accesslog.v3): attempts feed FleetHealth.

Every Envoy edge streams two logs here (cluster "gpu-router.xds"), each on its own stream
whose first message names it:

- ATTEMPT_LOG_NAME, the router's upstream_log, one entry per upstream attempt: each becomes a
  health sample for the provider it went to at once, so a provider that failed and was failed
  over from is still counted as failing; and for its (provider, model) once the request's
  entry has named the model (attribution.py);
- EDGE_LOG_NAME, the listener's log, one entry per client request: the client's outcome, which
  is not a provider sample (its attempts were). It names the model of the request's attempts
  and goes to the `on_request` hooks (ledger, audit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from control_plane.telemetry.attribution import ModelAttribution
from control_plane.telemetry.health import FleetHealth
from control_plane.telemetry.samples import decided_model, sample_from_attempt_entry
from control_plane.xds.peer import Admit, require_edge

logger = logging.getLogger(__name__)

ATTEMPT_LOG_NAME = "gpu-router.attempt"
EDGE_LOG_NAME = "gpu-router.edge"

RequestHook = Callable[[accesslog_pb2.HTTPAccessLogEntry, str], None]
"""Called with each client-request entry (EDGE_LOG_NAME) and the Envoy node id that sent it."""


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):
    """Turns streamed attempt entries into health samples and hands request entries to hooks.

    Samples are stamped with this process's clock on arrival, not with the Envoy host's,
    so that the health windows of many edges line up (Envoy flushes every 100 ms, so the
    arrival time is the attempt's end time to within that).
    """

    def __init__(
        self,
        fleet: FleetHealth,
        clock: Callable[[], float] = time.time,
        on_request: Iterable[RequestHook] = (),
        attribution: ModelAttribution | None = None,
        admit: Admit = require_edge,
    ) -> None:
        self._fleet = fleet
        self._admit = admit
        self._clock = clock
        self._attribution = ModelAttribution() if attribution is None else attribution
        self.on_request: list[RequestHook] = list(on_request)
        """Subscribers to client-request entries; append to subscribe."""

    def register(self, server: grpc.aio.Server) -> None:
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self, server)

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        await self._admit(context, "access logs")  # before a single entry is read
        # As the ALS API says, the identifier is sent in the first message of a stream only.
        node_id = log_name = ""
        entries = 0
        async for message in request_iterator:
            if message.HasField("identifier"):
                node_id = message.identifier.node.id
                log_name = message.identifier.log_name
                if log_name in (ATTEMPT_LOG_NAME, EDGE_LOG_NAME):
                    logger.info(
                        "access log stream opened", extra={"node": node_id, "log_name": log_name}
                    )
                else:
                    logger.warning(
                        "access log stream with an unknown log name is ignored",
                        extra={"node": node_id, "log_name": log_name},
                    )
            if not message.HasField("http_logs"):
                continue
            log_entries = message.http_logs.log_entry
            entries += len(log_entries)
            if log_name == ATTEMPT_LOG_NAME:
                self._record_attempts(log_entries, node_id)
            elif log_name == EDGE_LOG_NAME:
                self._notify_requests(log_entries, node_id)
        logger.info(
            "access log stream closed",
            extra={"node": node_id, "log_name": log_name, "entries": entries},
        )
        return als_pb2.StreamAccessLogsResponse()

    def _record_attempts(
        self, log_entries: Iterable[accesslog_pb2.HTTPAccessLogEntry], node_id: str
    ) -> None:
        now_ms = int(self._clock() * 1000)
        for entry in log_entries:
            sample = sample_from_attempt_entry(entry, node_id, at_unix_ms=now_ms)
            if sample is None:
                continue
            self._fleet.record(sample)
            attributed = self._attribution.attempt(sample, now_ms)
            if attributed is not None:
                self._fleet.record_model(attributed)

    def _notify_requests(
        self, log_entries: Iterable[accesslog_pb2.HTTPAccessLogEntry], node_id: str
    ) -> None:
        now_ms = int(self._clock() * 1000)
        for entry in log_entries:
            for attributed in self._attribution.request(
                entry.request.request_id, decided_model(entry), now_ms
            ):
                self._fleet.record_model(attributed)
            for hook in self.on_request:
                try:
                    hook(entry, node_id)
                except Exception:
                    # One failing subscriber must not stop the stream nor the others.
                    logger.exception(
                        "access log request hook failed",
                        extra={"node": node_id, "hook": getattr(hook, "__qualname__", repr(hook))},
                    )
