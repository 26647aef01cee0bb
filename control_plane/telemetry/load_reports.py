"""Envoy's load reporting service (envoy.service.load_stats.v3): requests in flight per provider.

Every edge opens one LRS stream to the control plane (`cluster_manager.load_stats_config` in
its bootstrap, cluster "gpu-router.xds"). The answer to its first message asks for every
cluster every `interval_s`; each report then carries, per cluster (= provider), the requests in
progress on that edge right now, which FleetHealth sums over edges. When a stream ends, what
it reported is forgotten.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator

import grpc
from envoy.service.load_stats.v3 import lrs_pb2, lrs_pb2_grpc
from google.protobuf import duration_pb2

from control_plane.telemetry.health import FleetHealth
from control_plane.telemetry.samples import INTERNAL_CLUSTER_PREFIX
from control_plane.xds.peer import Admit, require_edge

logger = logging.getLogger(__name__)

REPORT_INTERVAL_S = 1.0


def in_flight_by_provider(report: lrs_pb2.LoadStatsRequest) -> dict[str, int]:
    """Requests in progress per provider cluster in one report (the control plane's own left out)."""
    return {
        stats.cluster_name: sum(l.total_requests_in_progress for l in stats.upstream_locality_stats)
        for stats in report.cluster_stats
        if not stats.cluster_name.startswith(INTERNAL_CLUSTER_PREFIX)
    }


class LoadReportReceiver(lrs_pb2_grpc.LoadReportingServiceServicer):
    def __init__(
        self, fleet: FleetHealth, interval_s: float = REPORT_INTERVAL_S,
        admit: Admit = require_edge,
    ) -> None:
        self._fleet = fleet
        self._admit = admit
        interval = duration_pb2.Duration()
        interval.FromMilliseconds(int(interval_s * 1000))
        self._ask = lrs_pb2.LoadStatsResponse(send_all_clusters=True, load_reporting_interval=interval)
        self._streams = itertools.count(1)

    def register(self, server: grpc.aio.Server) -> None:
        lrs_pb2_grpc.add_LoadReportingServiceServicer_to_server(self, server)

    async def StreamLoadStats(
        self,
        request_iterator: AsyncIterator[lrs_pb2.LoadStatsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[lrs_pb2.LoadStatsResponse]:
        await self._admit(context, "load reports")  # before a single report is read
        # An edge may reconnect before its old stream is seen to end: each stream is its own source.
        source = f"stream-{next(self._streams)}"
        node_id: str | None = None
        try:
            async for report in request_iterator:
                if node_id is None:
                    node_id = report.node.id
                    logger.info("load report stream opened", extra={"node": node_id})
                    yield self._ask
                    continue
                self._fleet.record_in_flight(source, in_flight_by_provider(report))
        finally:
            self._fleet.forget_in_flight(source)
            logger.info("load report stream closed", extra={"node": node_id})
