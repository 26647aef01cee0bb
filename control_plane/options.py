"""The control plane's command line: every flag, its default and its check, as one frozen Options.

Kept apart from app.py (the process itself) so the flags read as one list and tests and the
Compose check can build Options without starting anything.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from control_plane.audit import KEEP_ROTATED, MAX_BYTES
from control_plane.ledger.health_history import INTERVAL_S as HISTORY_INTERVAL_S
from control_plane.ledger.store import RETENTION_DAYS, data_dir, default_ledger_path
from control_plane.policy.load import default_policy_path
from control_plane.telemetry.health import MAX_RETRY_AFTER_S
from control_plane.translate import EdgeSettings
from gpu_router import pki
from gpu_router.admin_token import ADMIN_TOKEN_FILE, admin_token
from gpu_router.redis_client import redis_url_problem
from gpu_router.redis_service import (
    CONTROL_PASSWORD_FILE,
    CONTROL_USER,
    password_file,
    read_password,
)
from gpu_router.revocation import CRL_FILE

DEFAULT_EXT_PROC = ("127.0.0.1", 50051)


def default_certs_dir() -> Path:
    """Where the control plane, `gpu-router up` and its clients keep the CA, certificates and
    secrets unless told otherwise."""
    return data_dir() / "certs"


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
    audit_log: Path | None = None
    """Also write the audit trail to this file as requests are booked (for shippers); None:
    the trail is only rendered on read from the ledger (`gpu-router audit`)."""
    edge_log_dir: Path | None = None
    """Where every edge appends each client request (a JSON line per request, one file per
    node) for the ledger to reconcile; None: no such file, ALS only. Needs a ledger."""
    edge_decision_log: bool = False
    """Each edge also writes one JSON line per request on its stdout (EdgeSettings)."""
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
    certs_dir: Path = field(default_factory=default_certs_dir)
    """Where the CA and this process's certificate are found, or made when absent."""
    tls: pki.TlsFiles | None = None
    """Bring your own CA, certificate and key (overrides certs_dir)."""
    tls_crl: Path | None = None
    """The CRL whose certificates the gRPC port refuses (gpu_router/revocation.py); None:
    crl.pem in certs_dir, or none with your own CA."""
    edge_tls_files: tuple[Path, Path] | None = None
    """(certificate chain, key) the edge listener serves to clients over TLS; None: plain
    HTTP."""
    admin_token_file: Path | None = None
    """The token the admin HTTP API asks for (admin_http.py); None: ADMIN_TOKEN_FILE in
    certs_dir, made on first start."""
    admin_tls_files: tuple[Path, Path] | None = None
    """(certificate chain, key) the admin HTTP API serves, HTTPS only; None: plain HTTP."""
    redis: str | None = None
    """The fleet's Redis (redis://, rediss:// with this process's TLS files, unix://), where the
    control plane deletes a revoked replica's user (redis_users.py); None: no Redis."""
    redis_password_file: Path | None = None
    """The password of the control plane's Redis user; None: certs_dir's (redis_service)."""

    def tls_files(self) -> pki.TlsFiles:
        """The gRPC port's CA, certificate and key: the given ones, else certs_dir's (made
        on first start; raises pki.PkiError when that directory cannot be completed)."""
        if self.tls is not None:
            return self.tls
        identity = pki.Identity(pki.Role.CONTROL_PLANE, pki.Role.CONTROL_PLANE.value)
        return pki.ensure(self.certs_dir, [identity])[identity.name]

    def admin_token(self) -> str:
        """The admin HTTP API's token, from admin_token_file or certs_dir's (made there when
        absent); SecretFileError naming the file when it cannot be used."""
        return admin_token(self.admin_token_file or self.certs_dir / ADMIN_TOKEN_FILE)

    def redis_password(self) -> str:
        """The control plane's Redis password (redis_password_file, else certs_dir's);
        SecretFileError naming the file when it cannot be used."""
        return read_password(self.redis_password_file
                             or password_file(self.certs_dir, CONTROL_USER))

    def crl_path(self) -> Path | None:
        """The CRL to read: the given one, else certs_dir's crl.pem (absent until a
        `gpu-router certs revoke`) unless the CA is your own."""
        if self.tls_crl is not None:
            return self.tls_crl
        return None if self.tls is not None else self.certs_dir / CRL_FILE

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
            decision_log_stdout=self.edge_decision_log,
            edge_tls=self.edge_tls_files is not None,
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
        "--certs-dir", type=Path, default=default_certs_dir(),
        help="the CA (ca.pem, ca-key.pem) and control-plane.pem/-key.pem, made when absent "
        "(default: %(default)s)",
    )
    parser.add_argument("--tls-ca", type=Path, help="bring your own: CA certificate (PEM) that "
                        "signed the clients' certificates (with --tls-cert, --tls-key)")
    parser.add_argument("--tls-cert", type=Path, help="bring your own: this server's certificate")
    parser.add_argument("--tls-key", type=Path, help="bring your own: this server's private key")
    parser.add_argument("--tls-crl", type=Path,
                        help="a CRL signed by the CA: its certificates are refused, read again "
                        "when it changes (default: crl.pem in --certs-dir, none with --tls-ca)")
    parser.add_argument(
        "--http-host", default="127.0.0.1", help="admin HTTP bind address (0.0.0.0 in a container)"
    )
    parser.add_argument("--http-port", type=int, default=8080, help="admin HTTP port")
    parser.add_argument("--http-tls-cert", type=Path,
                        help="PEM certificate chain the admin HTTP API serves (with "
                        "--http-tls-key: HTTPS only, so the admin token never crosses a network "
                        "in the clear; read at start; default: plain HTTP)")
    parser.add_argument("--http-tls-key", type=Path, help="its PEM private key")
    parser.add_argument("--admin-token-file", type=Path,
                        help="file holding the token every admin HTTP path but /healthz asks for "
                        "(default: admin-token in --certs-dir, made on first start)")
    parser.add_argument(
        "--redis",
        help="the fleet's Redis (redis://HOST:PORT, rediss://HOST:PORT with this process's TLS "
        "files, unix:///PATH/redis.sock): a revoked ext_proc replica's user is deleted there "
        "within a second (default: none)")
    parser.add_argument(
        "--redis-password-file", type=Path,
        help="the password of the control plane's Redis user (default: "
        f"{CONTROL_PASSWORD_FILE} in --certs-dir)")
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
        "--audit-log", type=Path, default=None,
        help="also write the audit trail to this file (JSON lines, rotated) as requests are "
        "booked; without it the trail is rendered from the ledger on read (gpu-router audit)"
    )
    parser.add_argument(
        "--edge-log-dir",
        type=Path,
        help="directory, on the edges' host, where each edge also appends every request to "
        "<node>.access.jsonl; the ledger is reconciled from it after a control-plane outage "
        "(default: off)",
    )
    parser.add_argument(
        "--edge-tls-cert", type=Path,
        help="PEM certificate chain the edge listener serves to clients (with --edge-tls-key: "
        "TLS only, HTTP/1.1 and h2; pushed to the edges over SDS, re-read when the file "
        "changes; default: plain HTTP)",
    )
    parser.add_argument("--edge-tls-key", type=Path, help="its PEM private key")
    parser.add_argument(
        "--edge-decision-log", action="store_true",
        help="each edge also writes one JSON line per request (the decision and who served) on "
        "Envoy's stdout (default: off; the ledger, the audit log and `gpu-router why` hold the "
        "same)",
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
    if args.redis is None and args.redis_password_file is not None:
        parser.error("--redis-password-file needs --redis")
    redis_problem = None if args.redis is None else redis_url_problem(
        args.redis, f"the control plane is Redis's user {CONTROL_USER!r}")
    if redis_problem is not None:
        parser.error(redis_problem)
    edge_tls = (args.edge_tls_cert, args.edge_tls_key)
    if any(edge_tls) and not all(edge_tls):
        parser.error("--edge-tls-cert and --edge-tls-key go together")
    admin_tls = (args.http_tls_cert, args.http_tls_key)
    if any(admin_tls) and not all(admin_tls):
        parser.error("--http-tls-cert and --http-tls-key go together")
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
        edge_decision_log=args.edge_decision_log,
        ledger_retention_days=args.ledger_retention_days,
        audit_max_bytes=args.audit_max_bytes,
        audit_keep=max(args.audit_keep, 0),
        max_retry_after_s=args.max_retry_after_s,
        health_history_interval_s=args.health_history_interval_s,
        log_level=args.log_level,
        certs_dir=args.certs_dir,
        tls=pki.TlsFiles(*own) if all(own) else None,
        tls_crl=args.tls_crl,
        admin_token_file=args.admin_token_file,
        admin_tls_files=(args.http_tls_cert, args.http_tls_key) if all(admin_tls) else None,
        redis=args.redis,
        redis_password_file=args.redis_password_file,
        edge_tls_files=(args.edge_tls_cert.resolve(), args.edge_tls_key.resolve())
        if all(edge_tls) else None,
    )
