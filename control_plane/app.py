"""The control-plane process: policy in, xDS out, telemetry back in, admin HTTP on the side.

Startup order matters: the policy is validated before any port opens (a bad file exits
with code 2 and the reason on stderr), and the first rollout runs before the watcher, so
the first nodes to connect already find a complete snapshot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from control_plane.accounting import Accounting
from control_plane.admin_http import AdminHttpServer
from control_plane.audit import KEEP_ROTATED, MAX_BYTES, default_audit_path
from control_plane.client_spend import ClientSpend, publish_spend
from control_plane.dashboard.data import dashboard_data
from control_plane.ledger.health_history import INTERVAL_S as HISTORY_INTERVAL_S
from control_plane.ledger.health_history import record_health
from control_plane.ledger.reconcile import Reconciler
from control_plane.ledger.why import UnknownRequestError, explain
from control_plane.ledger.store import RETENTION_DAYS, data_dir, default_ledger_path
from control_plane.metrics import Metrics
from control_plane.policy.credentials import credential_files
from control_plane.policy.load import default_policy_path
from control_plane.rollout import REJECTIONS, Release, Rollout, prepare_release
from control_plane.telemetry.als import AccessLogReceiver
from control_plane.telemetry.health import MAX_RETRY_AFTER_S, FleetHealth
from control_plane.telemetry.load_reports import LoadReportReceiver
from control_plane.telemetry.publisher import publish_health
from control_plane.telemetry.weights import publish_weights
from control_plane.translate import EdgeSettings
from control_plane.watch import PolicyWatcher
from control_plane.xds import type_urls
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.server import AggregatedDiscoveryServer
from gpu_router import pki
from gpu_router.api.v1 import health_pb2

log = logging.getLogger("control_plane")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
HEALTH_SNAPSHOT_NAME = "fleet"
CLIENT_SPEND_NAME = "clients"
EXIT_BAD_POLICY = 2
EXIT_FAILED = 1
DEFAULT_EXT_PROC = ("127.0.0.1", 50051)
_STOP_GRACE_S = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    policy: Path | None
    """None: the embedded default policy (not watched)."""
    xds_host: str = "127.0.0.1"
    xds_port: int = 18000
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    edge_host: str = "127.0.0.1"
    edge_port: int = 10000
    ext_proc_endpoints: tuple[tuple[str, int], ...] = (DEFAULT_EXT_PROC,)
    """(host, port) of every ext_proc replica; Envoy balances over them."""
    ledger: Path | None = field(default_factory=default_ledger_path)
    """SQLite usage ledger; None: no ledger."""
    audit_log: Path | None = field(default_factory=default_audit_path)
    """One JSON line per routing decision and its outcome; None: no audit log."""
    edge_log_dir: Path | None = None
    """Where every edge appends each client request (a JSON line per request, one file per
    node) for the ledger to reconcile; None: no such file, ALS only. Needs a ledger."""
    ledger_retention_days: float = RETENTION_DAYS
    """Ledger rows older than this are deleted."""
    audit_max_bytes: int = MAX_BYTES
    """The audit log is rotated at this size..."""
    audit_keep: int = KEEP_ROTATED
    """...keeping this many rotated files."""
    max_retry_after_s: float = MAX_RETRY_AFTER_S
    """The longest a provider's Retry-After (as an access-log entry tells it) ejects it for."""
    health_history_interval_s: float = HISTORY_INTERVAL_S
    """Each provider's and model's health is kept in the ledger's database this often (and at
    every state change) for `gpu-router replay` and `why`."""
    log_level: str = "info"
    certs_dir: Path = field(default_factory=lambda: data_dir() / "certs")
    """Where the CA and this process's certificate are found, or made when absent."""
    tls: pki.TlsFiles | None = None
    """Bring your own CA, certificate and key (overrides certs_dir)."""

    def tls_files(self) -> pki.TlsFiles:
        """The gRPC port's CA, certificate and key: the given ones, else certs_dir's (made
        on first start; raises pki.PkiError when that directory cannot be completed)."""
        if self.tls is not None:
            return self.tls
        identity = pki.Identity(pki.Role.CONTROL_PLANE, pki.Role.CONTROL_PLANE.value)
        return pki.ensure(self.certs_dir, [identity])[identity.name]

    @property
    def policy_path(self) -> Path:
        return self.policy if self.policy is not None else default_policy_path()

    def edge_settings(self) -> EdgeSettings:
        return EdgeSettings(
            edge_host=self.edge_host,
            edge_port=self.edge_port,
            ext_proc_endpoints=self.ext_proc_endpoints,
            capture_usage=self.ledger is not None or self.audit_log is not None,
            edge_log_dir=None if self.edge_log_dir is None else str(self.edge_log_dir),
        )


def _host_port(text: str) -> tuple[str, int]:
    """ "HOST:PORT" (an IPv6 host in brackets) as (host, port)."""
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _positive(kind: type[int | float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m control_plane", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--policy", type=Path, help="policy YAML, watched for changes (default: embedded)"
    )
    parser.add_argument(
        "--xds-host", default="127.0.0.1", help="ADS bind address (0.0.0.0 in a container)"
    )
    parser.add_argument("--xds-port", type=int, default=18000,
                        help="ADS, access-log and load-report gRPC port (mutual TLS)")
    parser.add_argument(
        "--certs-dir", type=Path, default=data_dir() / "certs",
        help="the CA (ca.pem, ca-key.pem) and control-plane.pem/-key.pem, made when absent "
        "(default: %(default)s)",
    )
    parser.add_argument("--tls-ca", type=Path, help="bring your own: CA certificate (PEM) that "
                        "signed the clients' certificates (with --tls-cert, --tls-key)")
    parser.add_argument("--tls-cert", type=Path, help="bring your own: this server's certificate")
    parser.add_argument("--tls-key", type=Path, help="bring your own: this server's private key")
    parser.add_argument(
        "--http-host", default="127.0.0.1", help="admin HTTP bind address (0.0.0.0 in a container)"
    )
    parser.add_argument("--http-port", type=int, default=8080, help="admin HTTP port")
    parser.add_argument(
        "--edge-host",
        default="127.0.0.1",
        help="address Envoy's edge listener binds (0.0.0.0 in a container)",
    )
    parser.add_argument(
        "--edge-port",
        type=int,
        default=10000,
        help="port of Envoy's edge listener (a node's metadata may ask for another)",
    )
    parser.add_argument(
        "--ext-proc-address",
        type=_host_port,
        action="append",
        metavar="HOST:PORT",
        help="an ext_proc replica; repeat for each one "
        f"(default: {DEFAULT_EXT_PROC[0]}:{DEFAULT_EXT_PROC[1]})",
    )
    parser.add_argument(
        "--ledger", type=Path, default=default_ledger_path(), help="SQLite usage ledger path"
    )
    parser.add_argument(
        "--audit-log", type=Path, default=default_audit_path(), help="routing audit log (JSON lines)"
    )
    parser.add_argument(
        "--edge-log-dir",
        type=Path,
        help="directory, on the edges' host, where each edge also appends every request to "
        "<node>.access.jsonl; the ledger is reconciled from it after a control-plane outage "
        "(default: off)",
    )
    parser.add_argument(
        "--ledger-retention-days", type=_positive(float), default=RETENTION_DAYS,
        help=f"delete ledger rows older than this (default: {RETENTION_DAYS})",
    )
    parser.add_argument(
        "--audit-max-bytes", type=_positive(int), default=MAX_BYTES,
        help=f"rotate the audit log at this size (default: {MAX_BYTES} = 100 MiB)",
    )
    parser.add_argument(
        "--audit-keep", type=int, default=KEEP_ROTATED,
        help=f"rotated audit logs kept, audit.jsonl.1 the newest (default: {KEEP_ROTATED})",
    )
    parser.add_argument(
        "--no-accounting",
        action="store_true",
        help="keep no ledger and no audit log, and do not capture usage at the edge "
        "(metrics and the dashboard still count requests, with estimated tokens)",
    )
    parser.add_argument(
        "--max-retry-after-s", type=_positive(float), default=MAX_RETRY_AFTER_S,
        help="the longest a provider's 429 Retry-After ejects it fleet-wide for "
        f"(default: {MAX_RETRY_AFTER_S:g})",
    )
    parser.add_argument(
        "--health-history-interval-s", type=_positive(float), default=HISTORY_INTERVAL_S,
        help="keep each provider's and model's health in the ledger this often, and at every "
        f"state change (default: {HISTORY_INTERVAL_S:g})",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    args = parser.parse_args(argv)
    own = (args.tls_ca, args.tls_cert, args.tls_key)
    if any(own) and not all(own):
        parser.error("--tls-ca, --tls-cert and --tls-key go together")
    return Options(
        policy=args.policy,
        xds_host=args.xds_host,
        xds_port=args.xds_port,
        http_host=args.http_host,
        http_port=args.http_port,
        edge_host=args.edge_host,
        edge_port=args.edge_port,
        ext_proc_endpoints=tuple(dict.fromkeys(args.ext_proc_address or [DEFAULT_EXT_PROC])),
        ledger=None if args.no_accounting else args.ledger,
        audit_log=None if args.no_accounting else args.audit_log,
        edge_log_dir=None if args.no_accounting or args.edge_log_dir is None
        else args.edge_log_dir.resolve(),
        ledger_retention_days=args.ledger_retention_days,
        audit_max_bytes=args.audit_max_bytes,
        audit_keep=max(args.audit_keep, 0),
        max_retry_after_s=args.max_retry_after_s,
        health_history_interval_s=args.health_history_interval_s,
        log_level=args.log_level,
        certs_dir=args.certs_dir,
        tls=pki.TlsFiles(*own) if all(own) else None,
    )


_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event (the message), then each `extra`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in _RECORD_FIELDS)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class ControlPlaneState:
    """What the admin HTTP surface shows (control_plane.admin_http.AdminState)."""

    def __init__(
        self, cache: SnapshotCache, rollout: Rollout, fleet: FleetHealth, metrics: Metrics,
        clients: ClientSpend | None = None, ledger: Path | None = None,
    ) -> None:
        self._ledger = ledger
        self._clients = clients
        self._cache = cache
        self._rollout = rollout
        self._fleet = fleet
        self._metrics = metrics

    def dashboard(self) -> dict[str, Any]:
        clients = self._clients.rows() if self._clients is not None else []
        return dashboard_data(self._metrics, datetime.now(UTC), clients)

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
        return explain(self._ledger, release.config, request_id)


async def serve(options: Options, stop: asyncio.Event, hangup: asyncio.Event | None = None) -> None:
    """Run every part of the control plane until `stop` is set or a part fails; each time
    `hangup` is set (SIGHUP), re-read the policy and its key files at once.

    Raises one of REJECTIONS, before any port is opened, when the startup policy is unusable.
    """
    settings = options.edge_settings()
    cache = SnapshotCache()
    rollout = Rollout(cache)
    fleet = FleetHealth(max_retry_after_s=options.max_retry_after_s)
    metrics = Metrics()
    first = prepare_release(options.policy_path, settings)
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

    # Watched: the policy file (unless embedded) and the key files it names, so a rotated key
    # reaches the edges over SDS; SIGHUP re-reads them at once. An env: key is read from this
    # process's environment, which cannot change: rotating one takes a restart.
    watcher = PolicyWatcher(
        options.policy_path, lambda path: prepare_release(path, settings), apply, REJECTIONS,
        also=lambda: credential_files((rollout.current or first).config),
    )

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
        AggregatedDiscoveryServer(cache), server
    )
    receiver = AccessLogReceiver(fleet, count=metrics.count_telemetry)
    receiver.on_request.append(accounting.book)
    receiver.register(server)
    LoadReportReceiver(fleet, count=metrics.count_telemetry).register(server)
    ca, cert, key = options.tls_files().read()
    server.add_secure_port(
        f"{options.xds_host}:{options.xds_port}",
        grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True),
    )
    await apply(first)
    await server.start()
    admin = AdminHttpServer(
        options.http_host, options.http_port, ControlPlaneState(cache, rollout, fleet, metrics, accounting.spend,
                                                     options.ledger)
    )
    await admin.start()
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
    if options.policy is not None:
        jobs.append(watcher.run())
    if hangup is not None:
        jobs.append(_reload_on(hangup, watcher))
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


async def _reload_on(hangup: asyncio.Event, watcher: PolicyWatcher[Release]) -> None:
    while True:
        await hangup.wait()
        hangup.clear()
        log.info("reload_requested")
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
    except (OSError, RuntimeError) as error:
        print(f"control plane: failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    return 0
