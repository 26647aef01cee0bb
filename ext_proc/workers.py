"""ext_proc processes: N spawned workers share one port (SO_REUSEPORT), each with its own
grpc.aio server and xDS client, so decisions scale with cores and no state is shared."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from types import FrameType

import grpc
import uvloop

from ext_proc.admission import Admission
from ext_proc.json_log import configure_logging
from ext_proc.rate_limit import Counters, LocalCounters, RateLimiter, RedisCounters
from ext_proc.router_state import LiveState
from ext_proc.service import ExternalProcessorService, add_to_server
from ext_proc.serving_status import ServingStatus
from ext_proc.xds_client import (
    AdsClient,
    Subscriptions,
    live_subscriptions,
    node_identity,
)
from gpu_router.grpc_tls import channel_credentials, server_credentials
from gpu_router.pki import TlsFiles
from gpu_router.revocation import RevocationError, Revocations

SHUTDOWN_GRACE_S = 2.0
EXIT_CANNOT_START = 2

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    listen: str
    """host:port of the ExternalProcessor gRPC server."""
    xds: str
    """host:port of the control plane's ADS server."""
    tls: TlsFiles
    """CA, certificate and key for mutual TLS: to the control plane, and on the ext_proc port
    (which takes only clients with a certificate of that CA; service.py admits only edges)."""
    crl: Path | None = None
    """A copy of the fleet's CRL (gpu_router/revocation.py), read again when it changes: edges
    whose certificate it revokes are refused. The control plane sends the CRL over xDS (a worker
    serves only once it has); the copy counts while the control plane is out of reach. None:
    xDS only."""
    log_level: str = "warning"
    redis: str | None = None
    """redis:// or unix:// URL of the fleet's shared rate-limit counters; None: counters in each
    worker."""
    redis_user: str | None = None
    """The replica's Redis user (--redis-user, else the name its certificate carries)."""
    redis_password: str | None = field(default=None, repr=False)
    """That user's password (read from --redis-password-file)."""


class BindError(RuntimeError):
    """The gRPC server could not listen on the configured address."""


async def serve(config: WorkerConfig, stop: asyncio.Event) -> None:
    """Serve ext_proc and follow the control plane until `stop` is set."""
    live = LiveState()
    # Messages stay small (headers and metadata: Envoy never sends bodies), so gRPC's default
    # message limits hold.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    counters: Counters
    if config.redis is None:
        counters = LocalCounters()
    else:
        counters = shared = RedisCounters(config.redis, user=config.redis_user,
                                          password=config.redis_password, tls=config.tls)
        await shared.warm()
    revocations = Revocations.open(config.crl, config.tls.ca)
    service = ExternalProcessorService(live, Admission(RateLimiter(counters)), revocations)
    add_to_server(service.Process, server)
    status = ServingStatus()
    await status.add_to(server)
    try:
        server.add_secure_port(config.listen, server_credentials(config.tls))
    except RuntimeError as error:
        raise BindError(f"cannot listen on {config.listen}: {error}") from error
    await server.start()
    # What start-up made (modules, protobuf descriptors, numpy) lives as long as the process:
    # out of the collector's generations, a full collection no longer walks it (~70k objects).
    gc.freeze()
    node = node_identity()
    _log.info(
        "ext_proc worker serving",
        extra={"listen": config.listen, "xds": config.xds, "node": node.id,
               "event_loop": type(asyncio.get_running_loop()).__module__},
    )
    tasks = (
        asyncio.create_task(
            AdsClient(
                config.xds, Subscriptions(node, live_subscriptions(live, revocations)),
                credentials=functools.partial(channel_credentials, config.tls),
            ).run()
        ),
        asyncio.create_task(status.serve_once_routable(live)),
    )
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await status.shutting_down()
        await server.stop(SHUTDOWN_GRACE_S)


async def _serve_until_signalled(config: WorkerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(config, stop)


def worker_main(config: WorkerConfig) -> None:
    """Entry point of one spawned worker process."""
    configure_logging(config.log_level)
    try:
        # uvloop's event loop: grpc.aio's per-stream machinery is most of a decision's CPU. On it
        # the fixed-answer floor ext_proc spent 12-17% less CPU per request and ours 6-15% (each
        # pair loaded in turn); the control plane measured no difference and stays on asyncio.
        uvloop.run(_serve_until_signalled(config))
    except (BindError, RevocationError) as error:  # the CRL may have turned bad since main
        _log.error("ext_proc worker cannot start", extra={"error": str(error)})
        raise SystemExit(EXIT_CANNOT_START) from error


def run_workers(config: WorkerConfig, count: int) -> int:
    """Spawn `count` workers, forward SIGTERM/SIGINT to them, return when all have exited.

    If one worker dies on its own, the rest are stopped too: a half-running
    replica would hide the failure behind the surviving workers. A worker still
    starting when the signal comes dies of it (its handlers are not installed
    yet): that counts as a clean stop.
    """
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=worker_main, args=(config,), name=f"ext-proc-worker-{i}")
        for i in range(count)
    ]

    stop_signals: set[int] = set()

    def signal_all(signum: int) -> None:
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, signum)

    def forward(signum: int, _frame: FrameType | None) -> None:
        stop_signals.add(signum)
        signal_all(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        worker.start()
    running = {worker.sentinel: worker for worker in workers}
    while running:
        for sentinel in wait(list(running)):
            worker = running.pop(sentinel)  # type: ignore[arg-type]
            worker.join()
            if worker.exitcode != 0 and running and not stop_signals:
                _log.error(
                    "ext_proc worker exited; stopping the others",
                    extra={"worker": worker.name, "exitcode": worker.exitcode},
                )
                signal_all(signal.SIGTERM)
    clean = {0} | {-signum for signum in stop_signals}
    return 0 if all(worker.exitcode in clean for worker in workers) else 1
