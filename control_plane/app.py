"""The control-plane process: policy in, xDS out, telemetry back in, admin HTTP on the side.

Startup order matters: the policy is validated before any port opens (a bad file exits
with code 2 and the reason on stderr), and the first rollout runs before the watcher, so
the first nodes to connect already find a complete snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import signal
import ssl
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from control_plane.accounting import Accounting
from control_plane.admin_http import AdminHttpServer, AdminTls, AdminTlsError
from control_plane.client_spend import ClientSpend, publish_spend
from control_plane.dashboard.data import dashboard_data
from control_plane.dashboard.savings_card import SavingsCard
from control_plane.json_log import configure_logging
from control_plane.ledger.health_history import record_health
from control_plane.ledger.reconcile import Reconciler
from control_plane.ledger.why import UnknownRequestError, explain
from control_plane.metrics import Metrics
from control_plane.options import Options, parse_args
from control_plane.policy.credentials import credential_files
from control_plane.redis_users import follow_revocations
from control_plane.rollout import (
    REJECTIONS,
    Release,
    Rollout,
    prepare_release,
    with_ext_proc_crl,
)
from control_plane.telemetry.als import AccessLogReceiver
from control_plane.telemetry.health import FleetHealth
from control_plane.telemetry.load_reports import LoadReportReceiver
from control_plane.telemetry.publisher import publish_health
from control_plane.telemetry.weights import publish_weights
from control_plane.watch import PolicyWatcher
from control_plane.xds import type_urls
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.peer import require_edge
from control_plane.xds.server import AggregatedDiscoveryServer, peer_by_certificate
from gpu_router.api.v1 import health_pb2, revocation_pb2
from gpu_router.grpc_tls import server_credentials
from gpu_router.revocation import RELOAD_EVERY_S, Revocations
from gpu_router.secret_files import SecretFileError

log = logging.getLogger("control_plane")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
HEALTH_SNAPSHOT_NAME = "fleet"
CLIENT_SPEND_NAME = "clients"
REVOCATION_LIST_NAME = "crl"
EXIT_BAD_POLICY = 2
EXIT_FAILED = 1
_STOP_GRACE_S = 2.0


class ControlPlaneState:
    """What the admin HTTP surface shows (control_plane.admin_http.AdminState)."""

    def __init__(
        self, cache: SnapshotCache, rollout: Rollout, fleet: FleetHealth, metrics: Metrics,
        clients: ClientSpend | None = None, ledger: Path | None = None,
    ) -> None:
        self._ledger = ledger
        self.savings = None if ledger is None else SavingsCard(
            ledger, lambda: None if rollout.current is None else rollout.current.config)
        self._clients = clients
        self._cache = cache
        self._rollout = rollout
        self._fleet = fleet
        self._metrics = metrics

    def dashboard(self) -> dict[str, Any]:
        clients = self._clients.rows() if self._clients is not None else []
        return dashboard_data(self._metrics, datetime.now(UTC), clients,
                              savings=None if self.savings is None else self.savings.summary)

    def metrics_exposition(self, accept: str) -> tuple[bytes, str]:
        return self._metrics.exposition(accept)

    def policy_summary(self) -> dict[str, Any]:
        release = self._rollout.current
        snapshot = self._cache.snapshot
        versions = {
            t.rsplit(".", 1)[-1]: snapshot.version(t)
            for t in type_urls.SEND_ORDER
            if snapshot.has(t)
        }
        if release is None:
            return {"source": None, "version": None, "xds_versions": versions}
        config = release.config
        return {
            "source": config.source,
            "version": config.version,
            "providers": [
                {
                    "name": p.name,
                    "base_url": p.base_url,
                    "gpus": [g.type for g in p.gpus],
                    "models": [o.model for o in p.offerings],
                }
                for p in config.providers
            ],
            "models": [m.name for m in config.models],
            "policies": [{"name": p.name, "strategy": p.strategy.value} for p in config.policies],
            "xds_versions": versions,
        }

    def xds_nodes(self) -> list[dict[str, Any]]:
        return self._cache.nodes()

    def health(self) -> dict[str, Any]:
        return self._fleet.to_json(int(time.time() * 1000))

    def why(self, request_id: str) -> dict[str, Any]:
        """One request's story (control_plane/ledger/why.py), priced with the policy served."""
        release = self._rollout.current
        if self._ledger is None or release is None or not self._ledger.is_file():
            raise UnknownRequestError("this control plane keeps no ledger")
        return explain(self._ledger, release.config, request_id, client_ids=False)


async def serve(options: Options, stop: asyncio.Event, hangup: asyncio.Event | None = None) -> None:
    """Run every part of the control plane until `stop` is set or a part fails; each time
    `hangup` is set (SIGHUP), re-read the policy, its key files and the admin API's pair at once.

    Raises one of REJECTIONS, before any port is opened, when the startup policy is unusable.
    """
    tls = options.tls_files()
    revocations = Revocations.open(options.crl_path(), tls.ca)  # a bad CRL: refuse to start
    admin_token = options.admin_token()  # one that cannot be read: refuse to start
    follow_redis = None if options.redis is None else functools.partial(  # password likewise
        follow_revocations, options.redis, options.redis_password(), tls, options.certs_dir)
    admin_tls = None if options.admin_tls_files is None else AdminTls(
        *options.admin_tls_files)  # likewise
    # Made with the pair it watches, so a renewal before the port opens is not missed.
    watchers = [] if admin_tls is None else [_admin_tls_watcher(admin_tls)]

    def prepare(path: Path) -> Release:
        """The policy's config, with the CRL the edges check ext_proc's certificates against."""
        settings = replace(options.edge_settings(), ext_proc_crl=revocations.current_pem())
        return prepare_release(path, settings, options.edge_tls_files)

    cache = SnapshotCache()

    def publish_crl(pem: bytes) -> bool:
        """Send every ext_proc replica this CRL (b"": none); whether it was new to them."""
        before = cache.snapshot.version(type_urls.REVOCATION_LIST)
        after = cache.set_types({type_urls.REVOCATION_LIST: {
            REVOCATION_LIST_NAME: revocation_pb2.RevocationList(crl_pem=pem)}})
        return after.version(type_urls.REVOCATION_LIST) != before

    publish_crl(revocations.current_pem())
    rollout = Rollout(cache)
    fleet = FleetHealth(max_retry_after_s=options.max_retry_after_s)
    metrics = Metrics()
    first = prepare(options.policy_path)
    accounting = Accounting(
        metrics, options.ledger, options.audit_log,
        retention_days=options.ledger_retention_days, audit_max_bytes=options.audit_max_bytes,
        audit_keep=options.audit_keep,
    )
    reconciler = None
    if options.edge_log_dir is not None and options.ledger is not None:
        options.edge_log_dir.mkdir(parents=True, exist_ok=True)
        reconciler = Reconciler(options.edge_log_dir, options.ledger, accounting, metrics,
                                retention_days=options.ledger_retention_days)
    async def apply(release: Release) -> None:
        await rollout.apply(release)
        accounting.use_policy(release.config)
        receiver.use_policy(release.config)  # the health table keeps its providers only

    # Watched: the policy file (unless embedded), the key files it names and the edge listener's
    # certificate and key, so a rotated key or certificate reaches the edges over SDS; SIGHUP
    # re-reads them at once. An env: key is read from this process's environment, which cannot
    # change: rotating one takes a restart. (The CRL: _send_crl_to_ext_proc, _send_crl_to_edges.)
    watcher = PolicyWatcher(
        options.policy_path, prepare, apply, REJECTIONS,
        also=lambda: (*credential_files((rollout.current or first).config),
                      *(options.edge_tls_files or ())),
    )

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
        AggregatedDiscoveryServer(
            cache, authenticate=functools.partial(peer_by_certificate, revocations=revocations)),
        server,
    )
    edges_only = functools.partial(require_edge, revocations=revocations)
    receiver = AccessLogReceiver(fleet, count=metrics.count_telemetry, admit=edges_only)
    receiver.on_request.append(accounting.book_request)
    receiver.on_attempt.append(accounting.add_attempt)  # kept only with a ledger
    receiver.register(server)
    LoadReportReceiver(fleet, count=metrics.count_telemetry, admit=edges_only).register(server)
    server.add_secure_port(f"{options.xds_host}:{options.xds_port}", server_credentials(tls))
    await apply(first)
    await server.start()
    state = ControlPlaneState(cache, rollout, fleet, metrics, accounting.spend, options.ledger)
    admin = AdminHttpServer(options.http_host, options.http_port, state, admin_token,
                            None if admin_tls is None else admin_tls.context)
    await admin.start()
    # What start-up made (modules, protobuf descriptors, the first snapshot) lives as long as
    # the process: out of the collector's generations, a full collection no longer walks it.
    gc.freeze()
    log.info(
        "control_plane_started",
        extra={
            "xds": f"{options.xds_host}:{options.xds_port}",
            "http": f"{options.http_host}:{admin.port}",
            "edge": f"{options.edge_host}:{options.edge_port}",
            "ext_proc": [f"{host}:{port}" for host, port in options.ext_proc_endpoints],
            "policy": first.config.source,
            "policy_version": first.config.version,
        },
    )

    def publish(snapshot: health_pb2.HealthSnapshot) -> None:
        cache.set_types({type_urls.HEALTH_SNAPSHOT: {HEALTH_SNAPSHOT_NAME: snapshot}})

    jobs: list[Coroutine[Any, Any, None]] = [
        publish_health(fleet, publish),
        publish_weights(fleet, lambda: [p.name for p in rollout.current.config.providers],
                        rollout.apply_weights),
        publish_spend(accounting.spend, lambda spent: cache.set_types(
            {type_urls.CLIENT_SPEND: {CLIENT_SPEND_NAME: spent}})),
    ]
    if options.ledger is not None:
        jobs.append(record_health(fleet, accounting.add_health,
                                  interval_s=options.health_history_interval_s))
    if state.savings is not None:
        jobs.append(state.savings.run())
    watchers.append(watcher)  # also on the embedded policy: its key files and certificate
    jobs += [each.run() for each in watchers]
    if revocations.path is not None:
        jobs += [_send_crl_to_ext_proc(revocations, publish_crl),
                 _send_crl_to_edges(revocations, rollout)]
    if follow_redis is not None:
        jobs.append(follow_redis())
    if hangup is not None:
        jobs.append(_reload_on(hangup, watchers))
    if reconciler is not None:
        jobs.append(reconciler.run())
    tasks = [asyncio.create_task(job) for job in jobs]
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopping], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopping:
                task.result()
                raise RuntimeError(f"background task {task.get_coro()!r} ended on its own")
    finally:
        for task in [*tasks, stopping]:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await admin.stop()
        await server.stop(_STOP_GRACE_S)
        accounting.close()
        if reconciler is not None:
            reconciler.close()
        log.info("control_plane_stopped")


async def _send_crl_to_ext_proc(revocations: Revocations,
                                publish: Callable[[bytes], bool]) -> None:
    """Within a second of the file's change, send each new CRL to every ext_proc replica, which
    then refuses a revoked edge: on a loop of its own, never behind a rollout's acks."""
    while True:
        await asyncio.sleep(RELOAD_EVERY_S)
        if publish(revocations.current_pem()):
            log.info("crl_sent_to_ext_proc", extra={"path": str(revocations.path)})


async def _send_crl_to_edges(revocations: Revocations, rollout: Rollout) -> None:
    """Send each new CRL to the edges with the served release's ext_proc cluster (a revoked
    replica then fails their handshakes), once any rollout in progress is acked."""
    while True:
        await asyncio.sleep(RELOAD_EVERY_S)
        crl = revocations.current_pem()
        if await rollout.reapply(functools.partial(with_ext_proc_crl, crl=crl)):
            log.info("crl_sent_to_edges", extra={"path": str(revocations.path)})


def _admin_tls_watcher(tls: AdminTls) -> PolicyWatcher[ssl.SSLContext]:
    """Serves the admin API's pair anew within a poll of its files' change (a renewal that does
    not check is logged, `admin_tls_rejected`, and the last good pair keeps serving)."""

    async def serve(context: ssl.SSLContext) -> None:
        tls.serve(context)
        log.info("admin_tls_reloaded", extra={"file": str(tls.cert)})

    return PolicyWatcher(tls.cert, lambda _path: tls.read(), serve, (AdminTlsError,),
                         also=lambda: (tls.key,), rejected="admin_tls_rejected")


async def _reload_on(hangup: asyncio.Event, watchers: list[PolicyWatcher[Any]]) -> None:
    while True:
        await hangup.wait()
        hangup.clear()
        log.info("reload_requested")
        for watcher in watchers:
            await watcher.reload()


async def _run(options: Options) -> None:
    stop, hangup = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hangup.set)
    await serve(options, stop, hangup)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m control_plane`; the process exit code."""
    options = parse_args(argv)
    configure_logging(options.log_level)
    try:
        asyncio.run(_run(options))
    except REJECTIONS as error:
        print(f"control plane: policy {options.policy_path} rejected:\n{error}", file=sys.stderr)
        return EXIT_BAD_POLICY
    except (OSError, RuntimeError, SecretFileError, AdminTlsError) as error:
        print(f"control plane: failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    return 0
