"""LoadReportReceiver over real gRPC: Envoy's LRS protocol in, FleetHealth's in-flight counts out."""

from __future__ import annotations

import asyncio

import grpc
from envoy.service.load_stats.v3 import lrs_pb2, lrs_pb2_grpc
from telemetry_fixtures import T0, edge_named, eventually

from control_plane.telemetry.health import PROVIDER_WIDE, FleetHealth
from control_plane.telemetry.load_reports import LoadReportReceiver, in_flight_by_provider


def report(in_progress_by_cluster: dict[str, list[int]] | None = None) -> lrs_pb2.LoadStatsRequest:
    """A report as Envoy sends it: per cluster, one entry per locality."""
    message = lrs_pb2.LoadStatsRequest()
    message.node.id = "edge-1"
    for cluster, per_locality in (in_progress_by_cluster or {}).items():
        stats = message.cluster_stats.add(cluster_name=cluster)
        for count in per_locality:
            stats.upstream_locality_stats.add(total_requests_in_progress=count)
    return message


def test_in_flight_sums_localities_and_leaves_out_the_control_planes_own_clusters() -> None:
    assert in_flight_by_provider(report({"vast": [2, 1], "runpod": [0], "gpu-router.xds": [4]})) == {"vast": 3, "runpod": 0}
    assert in_flight_by_provider(report()) == {}


def in_flight(fleet: FleetHealth, provider: str) -> int | None:
    found = fleet.get(provider, PROVIDER_WIDE, T0)
    return None if found is None else found.in_flight


async def _stream_reports() -> None:
    fleet = FleetHealth()
    server = grpc.aio.server()
    LoadReportReceiver(fleet, interval_s=1.5, admit=edge_named("edge-1")).register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        stream = lrs_pb2_grpc.LoadReportingServiceStub(channel).StreamLoadStats()
        await stream.write(report())  # Envoy's first message: the node, no stats
        ask = await stream.read()
        assert ask.send_all_clusters and ask.load_reporting_interval.ToMilliseconds() == 1500
        assert in_flight(fleet, "vast") is None

        await stream.write(report({"vast": [2, 1], "gpu-router.xds": [1]}))
        await eventually(lambda: in_flight(fleet, "vast") == 3, "the report to count vast's requests")
        await stream.write(report())
        await eventually(lambda: in_flight(fleet, "vast") == 0, "an empty report to clear them")

        await stream.write(report({"vast": [5]}))
        await eventually(lambda: in_flight(fleet, "vast") == 5, "the next report")
        await stream.done_writing()
        await eventually(lambda: in_flight(fleet, "vast") == 0, "the ended stream to be forgotten")
    finally:
        await channel.close()
        await server.stop(None)


def test_reports_over_a_stream_set_the_in_flight_counts_until_it_ends() -> None:
    asyncio.run(_stream_reports())

