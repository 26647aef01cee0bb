"""Telemetry is checked entry by entry: what an (even authenticated) edge may not make the
control plane believe, and that one bad entry costs neither its batch nor its stream.

Entries go over real gRPC to the receivers; a stream-unary call returns only once the
handler has read every message, so the assertions after it need no polling.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.load_stats.v3 import lrs_pb2
from google.protobuf import duration_pb2
from telemetry_fixtures import edge_named

from control_plane.accounting import Accounting
from control_plane.dashboard.data import dashboard_data
from control_plane.metrics import Metrics
from control_plane.policy.load import default_policy_path, load_policy_file
from control_plane.telemetry.als import ATTEMPT_LOG_NAME, EDGE_LOG_NAME, AccessLogReceiver
from control_plane.telemetry.health import PROVIDER_WIDE, FleetHealth, HealthState
from control_plane.telemetry.load_reports import in_flight_by_provider

NOW_MS = 1_800_000_000_000
POLICY = load_policy_file(default_policy_path())
"""Providers lambda, coreweave, vast, runpod; runpod offers llama-3.1-8b and mixtral-8x7b."""
STREAM_ACCESS_LOGS = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"


class Counts:
    """A CountTelemetry that remembers: (kind, reason, dropped) -> times."""

    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str, bool]] = Counter()

    def __call__(self, kind: str, reason: str, *, dropped: bool = True) -> None:
        self.seen[(kind, reason, dropped)] += 1


class CountingMetrics(Metrics):
    """Metrics whose telemetry counts can be compared whole."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = Counts()

    def count_telemetry(self, kind: str, reason: str, *, dropped: bool = True) -> None:
        self.counts(kind, reason, dropped=dropped)
        super().count_telemetry(kind, reason, dropped=dropped)


def clock(unix_ms: int = NOW_MS) -> float:
    return unix_ms / 1000.0


def entry(request_id: str, cluster: str = "runpod", status: int = 200, *,
          start_ms: int = NOW_MS - 500, model: str = "llama-3.1-8b",
          policy: str = "batch") -> accesslog_pb2.HTTPAccessLogEntry:
    """A final entry as an edge logs it (an attempt, or with a decision, a client request)."""
    log = accesslog_pb2.HTTPAccessLogEntry()
    common = log.common_properties
    common.start_time.FromMilliseconds(start_ms)
    common.upstream_cluster = cluster
    common.duration.FromMilliseconds(200)
    common.time_to_last_downstream_tx_byte.FromMilliseconds(200)
    common.upstream_request_attempt_count = 1
    if model:
        common.metadata.filter_metadata["gpu_router"].update(
            {"model": model, "policy": policy, "provider": cluster})
    log.request.request_id = request_id
    log.request.request_body_bytes = 120
    log.response.response_code.value = status
    log.response.response_body_bytes = 400
    return log


def message(log_name: str | None, entries: Iterable[accesslog_pb2.HTTPAccessLogEntry]) -> bytes:
    out = als_pb2.StreamAccessLogsMessage()
    if log_name is not None:
        out.identifier.node.id = "edge-1"
        out.identifier.log_name = log_name
    out.http_logs.log_entry.extend(entries)
    return out.SerializeToString()


async def _stream(receiver: AccessLogReceiver, messages: list[bytes]) -> None:
    server = grpc.aio.server()
    receiver.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_unary(STREAM_ACCESS_LOGS, request_serializer=None,
                                        response_deserializer=None)
            await call(iter(messages))
    finally:
        await server.stop(grace=None)


def stream(receiver: AccessLogReceiver, *messages: bytes) -> None:
    """Send raw messages on one ALS stream; returns once the receiver has read them all."""
    asyncio.run(_stream(receiver, list(messages)))


def receiver_for(fleet: FleetHealth, counts: Counts, at_ms: int = NOW_MS, certified: str = "edge-1",
                 **kwargs: object) -> AccessLogReceiver:
    """`certified`: the node the peer's certificate names (message() says it is edge-1)."""
    receiver = AccessLogReceiver(fleet, lambda: clock(at_ms), admit=edge_named(certified),
                                 count=counts, **kwargs)
    receiver.use_policy(POLICY)
    return receiver


def test_a_forged_retry_after_of_300_s_ejects_for_the_60_s_cap_only() -> None:
    fleet, counts = FleetHealth(), Counts()
    limited = entry("forged", status=429)
    limited.response.response_headers["retry-after"] = "300"

    stream(receiver_for(fleet, counts), message(ATTEMPT_LOG_NAME, [limited]))

    ejected = fleet.get("runpod", PROVIDER_WIDE, NOW_MS)
    assert ejected is not None and ejected.state is HealthState.EJECTED
    assert ejected.cooldown_until_unix_ms == NOW_MS + 60_000
    assert ejected.reason == "rate limited (Retry-After 60 s)"
    after = fleet.get("runpod", PROVIDER_WIDE, NOW_MS + 61_000)
    assert after is not None and after.state is not HealthState.EJECTED
    assert counts.seen == {("attempt", "retry_after_capped", False): 1}


def test_entries_for_unknown_clusters_are_counted_and_never_grow_the_health_table() -> None:
    fleet, counts = FleetHealth(), Counts()
    invented = [entry(f"r{i}", cluster=f"invented-{i}", status=503) for i in range(50)]
    invented[0].common_properties.start_time.seconds = 10**15  # the cluster is checked first

    stream(receiver_for(fleet, counts), message(ATTEMPT_LOG_NAME, [*invented, entry("ok")]))

    assert {view.provider for view in fleet.entries(NOW_MS)} == {"runpod"}
    assert counts.seen == {("attempt", "unknown_cluster", True): 50}
    report = lrs_pb2.LoadStatsRequest()
    for name in ("vast", "invented", "gpu-router.xds"):
        report.cluster_stats.add(cluster_name=name).upstream_locality_stats.add(
            total_requests_in_progress=3)
    assert in_flight_by_provider(report, fleet, count=counts) == {"vast": 3}
    assert counts.seen[("load_report", "unknown_cluster", True)] == 1


def test_impossible_times_and_sizes_of_attempts_are_dropped_by_reason() -> None:
    fleet, counts = FleetHealth(), Counts()
    future = entry("future", start_ms=NOW_MS + 3_600_000)
    old = entry("old", start_ms=NOW_MS - 86_400_000)
    negative = entry("negative")
    negative.common_properties.duration.CopyFrom(duration_pb2.Duration(seconds=-5))
    absurd = entry("absurd")
    absurd.common_properties.time_to_last_upstream_rx_byte.FromSeconds(10 * 86_400)
    wrapped = entry("wrapped")
    wrapped.response.response_body_bytes = 2**64 - 1  # what a forged -1 arrives as

    stream(receiver_for(fleet, counts),
           message(ATTEMPT_LOG_NAME, [future, old, negative, absurd, wrapped, entry("ok")]))

    assert counts.seen == {("attempt", "future_start", True): 1, ("attempt", "too_old", True): 1,
                           ("attempt", "bad_duration", True): 2, ("attempt", "bad_size", True): 1}
    view = fleet.get("runpod", PROVIDER_WIDE, NOW_MS)
    assert view is not None and view.samples == 1


def test_a_model_the_provider_does_not_offer_stays_out_of_the_health_table() -> None:
    fleet, counts = FleetHealth(), Counts()
    receiver = receiver_for(fleet, counts)

    stream(receiver,
           message(ATTEMPT_LOG_NAME, [entry("a", model=""), entry("b", model="")]))
    stream(receiver, message(EDGE_LOG_NAME, [entry("a", model="llama-3.1-8b"),
                                             entry("b", model="bge-large")]))

    assert [(v.provider, v.model) for v in fleet.entries(NOW_MS)] == [
        ("runpod", PROVIDER_WIDE), ("runpod", "llama-3.1-8b")]
    assert counts.seen == {("edge", "unknown_model", True): 1}


def test_a_policy_edit_that_removes_a_provider_removes_its_health() -> None:
    fleet, counts = FleetHealth(), Counts()
    receiver = receiver_for(fleet, counts)
    stream(receiver, message(ATTEMPT_LOG_NAME, [entry("a"), entry("b", cluster="vast")]))
    fleet.record_in_flight("edge-1", {"runpod": 2, "vast": 1}, edge="edge-1")
    assert {v.provider for v in fleet.entries(NOW_MS)} == {"runpod", "vast"}

    without_runpod = dataclasses.replace(
        POLICY, providers=tuple(p for p in POLICY.providers if p.name != "runpod"))
    receiver.use_policy(without_runpod)
    stream(receiver, message(ATTEMPT_LOG_NAME, [entry("c")]))

    assert {v.provider for v in fleet.entries(NOW_MS)} == {"vast"}
    assert fleet.to_json(NOW_MS)["providers"]["vast"]["in_flight"] == 1
    assert counts.seen == {("attempt", "unknown_cluster", True): 1}
    # The policy brought the caps too: vast at its cap is at_cap.
    vast_cap = next(p.max_concurrency for p in POLICY.providers if p.name == "vast")
    fleet.record_in_flight("edge-1", {"vast": vast_cap}, edge="edge-1")
    assert fleet.to_json(NOW_MS)["at_cap"] == {"edge-1": ["vast"]}


def test_one_bad_entry_or_message_costs_neither_the_batch_nor_the_stream() -> None:
    metrics, counts = CountingMetrics(), Counts()
    accounting = Accounting(metrics, None, None, clock=clock)
    accounting.use_policy(POLICY)
    receiver = receiver_for(FleetHealth(), counts, on_request=[accounting.book_request])
    unreadable = entry("unreadable")
    unreadable.common_properties.start_time.seconds = 10**15  # past year 9999: raises
    odd_agent = entry("odd-agent")
    odd_agent.request.user_agent = "\x00MARK"
    sent = [entry("good-1"), entry("future", start_ms=NOW_MS + 86_400_000), entry("good-2"),
            unreadable, entry("no-such-model", model="gpt-invented"), odd_agent,
            entry("odd-model", model="llama-3.1-8b\x00MARK"), entry("good-3")]
    # Invalid UTF-8 in two string fields, which Python protobuf refuses in any message.
    first = message(EDGE_LOG_NAME, sent).replace(b"\x00MARK", b"\xffMARK")

    stream(receiver, first, b"\x0a\xff\xff", message(None, [entry("good-4")]))

    booked = {e.request.request_id for e in [*sent, entry("good-4")]
              if e.request.request_id in accounting.booked}
    assert booked == {"good-1", "good-2", "good-3", "odd-agent", "good-4"}
    # The receiver reads each entry once (and counts one it cannot read); the ledger checks
    # the names of what it was handed.
    assert counts.seen == {("edge", "invalid_utf8", False): 2,
                           ("edge", "unparseable_message", True): 1,
                           ("edge", "unreadable", True): 1}
    assert metrics.counts.seen == {  # the repaired model names no model either
        ("edge", "future_start", True): 1, ("edge", "unknown_model", True): 2}


def test_an_edge_that_calls_itself_another_node_is_refused_and_books_nothing() -> None:
    accounting = Accounting(CountingMetrics(), None, None, clock=clock)
    accounting.use_policy(POLICY)
    fleet = FleetHealth()
    receiver = receiver_for(fleet, Counts(), certified="edge-2",
                            on_request=[accounting.book_request])

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        stream(receiver, message(EDGE_LOG_NAME, [entry("claimed")]))

    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "claimed" not in accounting.booked
    assert not list(fleet.entries(NOW_MS))  # nor a health sample from it


def test_a_future_dated_edge_entry_leaves_the_dashboard_as_it_was() -> None:
    metrics = Metrics()
    accounting = Accounting(metrics, None, None, clock=clock)
    accounting.use_policy(POLICY)
    assert accounting.book(entry("served"), "edge-1")
    now = datetime.fromtimestamp(NOW_MS / 1000, tz=UTC)
    before = dashboard_data(metrics, now)

    assert not accounting.book(entry("from-the-future", start_ms=NOW_MS + 86_400_000), "edge-1")

    assert dashboard_data(metrics, now) == before
    assert before["totals"]["runpod"]["requests"] == 1
    assert metrics.telemetry_dropped.value(("edge", "future_start")) == 1


@pytest.mark.parametrize(("change", "reason"), [
    (lambda e: setattr(e.request, "request_body_bytes", 2**64 - 1), "bad_size"),
    (lambda e: e.common_properties.duration.CopyFrom(duration_pb2.Duration(nanos=-1)),
     "bad_duration"),
    (lambda e: setattr(e.common_properties, "upstream_cluster", "invented"), "unknown_cluster"),
    (lambda e: e.common_properties.metadata.filter_metadata["gpu_router"].update(
        {"policy": "invented"}), "unknown_policy"),
    (lambda e: e.common_properties.metadata.filter_metadata["gpu_router"].update(
        {"client": "invented"}), "unknown_client"),
    (lambda e: setattr(e.request, "request_id", ""), "no_request_id"),
])
def test_an_edge_entry_that_is_not_believable_is_not_booked(change: object, reason: str) -> None:
    metrics = CountingMetrics()
    accounting = Accounting(metrics, None, None, clock=clock)
    accounting.use_policy(POLICY)
    bad = entry("bad")
    change(bad)  # type: ignore[operator]

    assert not accounting.book(bad, "edge-1")
    assert metrics.counts.seen == {("edge", reason, True): 1}
    assert metrics.recent_decisions() == []


def test_a_provider_removed_by_an_edit_is_still_booked_for_requests_in_flight() -> None:
    at_ms = [NOW_MS]
    metrics = Metrics()
    accounting = Accounting(metrics, None, None, clock=lambda: clock(at_ms[0]))
    accounting.use_policy(POLICY)
    accounting.use_policy(dataclasses.replace(
        POLICY, providers=tuple(p for p in POLICY.providers if p.name != "runpod")))

    assert accounting.book(entry("in-flight"), "edge-1")
    at_ms[0] += 3_601_000  # past the longest request
    assert not accounting.book(entry("later", start_ms=at_ms[0] - 500), "edge-1")
    assert metrics.telemetry_dropped.value(("edge", "unknown_cluster")) == 1
