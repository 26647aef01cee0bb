"""The control plane's work per client request, in-process: µs per access-log entry.

What the control plane does with each entry of the edge's gRPC access log, without gRPC's
transport: each message is parsed as the server's deserializer parses it
(wire_utf8.lenient_deserializer), then read by AccessLogReceiver.StreamAccessLogs (the record
read once, the served attempt's health sample, model attribution) and booked by Accounting
(usage, price, metrics, the ledger row, handed to its writer thread). Entries look like the
routed bench's traffic: the default policy's providers, a decision, usage text, an ext_proc
latency, 100 entries per message as Envoy batches them. Each round books into a ledger writer of
its own and closes it before the round's clock stops, so its process CPU time holds all of that
round's writing (the writer thread's inserts) and nothing of another round's; it is also timed in
this thread's CPU time (the event loop's share). The best and median rounds are printed.

    python bench/booking.py [--entries 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from control_plane.accounting import Accounting
from control_plane.metrics import Metrics
from control_plane.policy.load import default_policy_path, load_policy_file
from control_plane.telemetry.als import AccessLogReceiver
from control_plane.telemetry.health import FleetHealth
from control_plane.telemetry.wire_utf8 import Received, lenient_deserializer
from control_plane.translate.names import ACCESS_LOG_NAME
from control_plane.xds.peer import Peer
from gpu_router.pki import Role

PER_MESSAGE = 100
USAGE = '"usage":{"prompt_tokens":120,"completion_tokens":64,"total_tokens":184}}'
MODEL = "llama-3.1-8b"


def entry(index: int, provider: str, now_ms: int) -> accesslog_pb2.HTTPAccessLogEntry:
    """A served client request as the edge logs it."""
    log = accesslog_pb2.HTTPAccessLogEntry()
    common = log.common_properties
    common.start_time.FromMilliseconds(now_ms - 100)
    common.upstream_cluster = provider
    common.upstream_request_attempt_count = 1
    common.route_name = f"interactive/{MODEL}/1"
    for name, ms in (("time_to_last_rx_byte", 1), ("time_to_first_upstream_tx_byte", 2),
                     ("time_to_last_upstream_tx_byte", 2), ("time_to_first_upstream_rx_byte", 30),
                     ("time_to_last_upstream_rx_byte", 60),
                     ("time_to_first_downstream_tx_byte", 31),
                     ("time_to_last_downstream_tx_byte", 61), ("duration", 61)):
        getattr(common, name).FromMilliseconds(ms)
    metadata = common.metadata.filter_metadata
    metadata["gpu_router"].update({
        "provider": provider, "model": MODEL, "policy": "interactive",
        "strategy": "latency", "reason": "fastest: 40 ms EWMA", "fallbacks": "runpod,vast",
        "candidates": "coreweave=40;runpod=55;vast=61;lambda=x:ejected",
        "path": "/v1/chat/completions"})
    metadata["gpu_router.request"].update({"model": MODEL, "stream": False})
    metadata["gpu_router.usage"].update({"text": USAGE})
    common.custom_tags["ext_proc_us"] = "850"
    log.request.request_id = f"req-{index}"
    log.request.request_body_bytes = 480
    log.response.response_code.value = 200
    log.response.response_body_bytes = 700
    return log


def messages(start: int, count: int, now_ms: int, providers: tuple[str, ...]) -> list[bytes]:
    """`count` entries as serialized StreamAccessLogsMessages, served by `providers` in turn;
    the first names the log."""
    out = []
    for first in range(start, start + count, PER_MESSAGE):
        message = als_pb2.StreamAccessLogsMessage()
        if first == start:
            message.identifier.node.id = "edge-1"
            message.identifier.log_name = ACCESS_LOG_NAME
        message.http_logs.log_entry.extend(
            entry(i, providers[i % len(providers)], now_ms)
            for i in range(first, min(first + PER_MESSAGE, start + count)))
        out.append(message.SerializeToString())
    return out


async def accept_edge(_context: object, _asked: str) -> Peer:
    """Admits the stream as edge-1 (in-process: no peer to check)."""
    return Peer("bench", Role.EDGE, "edge-1")


class _Context:
    """The one thing StreamAccessLogs asks of its context once the peer is admitted."""

    async def abort(self, code: object, details: str) -> None:
        raise RuntimeError(f"stream refused: {code} {details}")


async def one_round(receiver: AccessLogReceiver, wire: list[bytes]) -> None:
    parse = lenient_deserializer(als_pb2.StreamAccessLogsMessage)

    async def stream() -> AsyncIterator[Received[als_pb2.StreamAccessLogsMessage]]:
        for data in wire:
            yield parse(data)

    await receiver.StreamAccessLogs(stream(), _Context())  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    config = load_policy_file(default_policy_path())
    with tempfile.TemporaryDirectory(prefix="booking-") as work:
        ledger_path = Path(work) / "ledger.db"
        metrics = Metrics()
        receiver = AccessLogReceiver(FleetHealth(), admit=accept_edge,
                                     count=metrics.count_telemetry)
        receiver.use_policy(config)

        def booking() -> Accounting:
            """A ledger writer of its own, the receiver's one subscriber."""
            accounting = Accounting(metrics, ledger_path, None)
            accounting.use_policy(config)
            receiver.on_request[:] = [accounting.book_request]
            return accounting

        now_ms = int(time.time() * 1000)
        providers = tuple(provider.name for provider in config.providers
                          if any(offering.model == MODEL for offering in provider.offerings))
        warm_up = booking()
        asyncio.run(one_round(receiver, messages(0, 1000, now_ms, providers)))
        warm_up.close()
        process, thread = [], []
        for number in range(args.rounds):
            wire = messages((number + 1) * args.entries, args.entries, now_ms, providers)
            accounting = booking()
            process_start, thread_start = time.process_time(), time.thread_time()
            asyncio.run(one_round(receiver, wire))
            thread_end = time.thread_time()
            accounting.close()  # its writer has written every row of the round
            process.append((time.process_time() - process_start) / args.entries * 1e6)
            thread.append((thread_end - thread_start) / args.entries * 1e6)
        with sqlite3.connect(ledger_path) as ledger:
            (booked,) = ledger.execute("SELECT count(*) FROM requests").fetchone()
    expected = 1000 + args.rounds * args.entries
    if booked != expected:
        raise SystemExit(f"booked {booked} of {expected} entries: the bench's entries are wrong")
    for name, values in (("process CPU", process), ("event-loop thread", thread)):
        ordered = sorted(values)
        median = ordered[len(ordered) // 2]
        print(f"{name:18s} best {ordered[0]:6.1f} us/entry, median {median:6.1f}")


if __name__ == "__main__":
    main()
