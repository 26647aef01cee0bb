"""Envoy's load reporting service (envoy.service.load_stats.v3): requests in flight per provider.

Every edge opens one LRS stream to the control plane (`cluster_manager.load_stats_config` in
its bootstrap, cluster "gpu-router.xds"). The answer to its first message asks for every
cluster every `interval_s`; each report then carries, per cluster (= provider), the requests in
progress on that edge right now, which FleetHealth sums over edges and compares with each
provider's cap (in_flight.py). When a stream ends, what it reported is forgotten, unless its edge
already reports on a newer one. Counts for clusters that are not providers of the current policy, or
beyond belief, are dropped and counted (validation.py); a report that cannot be read costs only
itself, never the stream.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator

import grpc
from envoy.service.load_stats.v3 import lrs_pb2
from google.protobuf import duration_pb2

from control_plane.telemetry.health import FleetHealth
from control_plane.telemetry.validation import (
    DEFAULT_LIMITS,
    INVALID_UTF8,
    LOAD_REPORT,
    UNPARSEABLE_MESSAGE,
    UNREADABLE,
    CountTelemetry,
    Limits,
    checked_in_flight,
    count_nothing,
)
from control_plane.telemetry.wire_utf8 import Received, register_lenient, repaired_parts
from control_plane.xds.peer import Admit, refuse_other_node, refuse_revoked, require_edge

logger = logging.getLogger(__name__)

REPORT_INTERVAL_S = 1.0
_SERVICE = lrs_pb2.DESCRIPTOR.services_by_name["LoadReportingService"].full_name


def in_flight_by_provider(
    report: lrs_pb2.LoadStatsRequest, fleet: FleetHealth | None = None,
    limits: Limits = DEFAULT_LIMITS, count: CountTelemetry = count_nothing,
) -> dict[str, int]:
    """Requests in progress per provider cluster in one report (the control plane's own left
    out; with a fleet, only the providers it holds, counting the rest)."""
    reported = (
        (stats.cluster_name, sum(l.total_requests_in_progress for l in stats.upstream_locality_stats))
        for stats in report.cluster_stats
    )
    return checked_in_flight(reported, None if fleet is None else fleet.knows, limits, count)


class LoadReportReceiver:
    def __init__(
        self, fleet: FleetHealth, interval_s: float = REPORT_INTERVAL_S,
        admit: Admit = require_edge,
        *, count: CountTelemetry = count_nothing, limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._fleet = fleet
        self._count = count
        self._limits = limits
        self._admit = admit
        interval = duration_pb2.Duration()
        interval.FromMilliseconds(int(interval_s * 1000))
        self._ask = lrs_pb2.LoadStatsResponse(send_all_clusters=True, load_reporting_interval=interval)
        self._streams = itertools.count(1)

    def register(self, server: grpc.aio.Server) -> None:
        """As the generated add_LoadReportingServiceServicer_to_server, but with a request
        deserializer that does not end the stream on invalid UTF-8 (wire_utf8.py)."""
        register_lenient(server, _SERVICE, "StreamLoadStats", self.StreamLoadStats,
                         lrs_pb2.LoadStatsRequest, lrs_pb2.LoadStatsResponse,
                         stream_response=True)

    async def StreamLoadStats(
        self,
        request_iterator: AsyncIterator[Received[lrs_pb2.LoadStatsRequest]],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[lrs_pb2.LoadStatsResponse]:
        peer = await self._admit(context, "load reports")  # before a single report is read
        # An edge may reconnect before its old stream is seen to end: the stream's own id lets
        # the old one's end leave the new one's counts alone (in_flight.py).
        source = f"stream-{next(self._streams)}"
        node_id: str | None = None
        try:
            async for received in request_iterator:
                await refuse_revoked(context, peer, "load reports")  # revoked since it opened
                report = received.message
                if report is None:
                    self._count(LOAD_REPORT, UNPARSEABLE_MESSAGE)
                    continue
                for _ in range(repaired_parts(received.repaired)):
                    self._count(LOAD_REPORT, INVALID_UTF8, dropped=False)
                if node_id is None:
                    node_id = report.node.id
                    await refuse_other_node(context, peer, node_id, "load reports")
                    logger.info("load report stream opened", extra={"node": node_id})
                    yield self._ask
                    continue
                self._record(source, peer.name, report)
        finally:
            self._fleet.forget_in_flight(source)
            logger.info("load report stream closed", extra={"node": node_id})

    def _record(self, source: str, edge: str, report: lrs_pb2.LoadStatsRequest) -> None:
        """`edge`: the certified name of the stream's peer (which its node id must match), the
        key ext_proc looks a request's edge up by."""
        try:
            in_flight = in_flight_by_provider(report, self._fleet, self._limits, self._count)
        except Exception:  # one report never costs the stream
            logger.debug("unreadable load report", exc_info=True, extra={"source": source})
            self._count(LOAD_REPORT, UNREADABLE)
            return
        self._fleet.record_in_flight(source, in_flight, edge=edge)
