"""`gpu-router`: run the local stack, validate policy files."""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import tempfile
import urllib.parse
from pathlib import Path

from control_plane.edge_certificate import EdgeCertificateError, read_listener_certificate
from control_plane.ledger.report import ReportError, run_report
from control_plane.ledger.store import default_ledger_path
from control_plane.options import default_certs_dir
from control_plane.policy.load import PolicyError, default_policy_path, load_policy_file
from control_plane.translate import TranslationError, check_translatable
from gpu_router import pki
from gpu_router.admin_token import ADMIN_TOKEN_FILE, bearer, read_admin_token
from gpu_router.analysis_cli import add_analysis_commands
from gpu_router.edge_guard import is_loopback, open_edge_refusal
from gpu_router.fleet_certs import fleet
from gpu_router.health_view import render_health
from gpu_router.keys_cli import add_keys_command, client_report
from gpu_router.processes import Cancelled, ProcessError, http_get
from gpu_router.redis_service import RedisPasswordError, ensure_password, password_file
from gpu_router.revocation import RevocationError, revoke
from gpu_router.secret_files import SecretFileError
from gpu_router.stack import Stack, StackPorts
from gpu_router.supervisor import StopSignals, Supervisor


def validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            config = load_policy_file(path)
            check_translatable(config)  # what the control plane would refuse to serve
        except (PolicyError, OSError, TranslationError) as error:
            print(f"{path}: {error}" if isinstance(error, TranslationError) else error,
                  file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: ok ({len(config.providers)} providers, {len(config.models)} models, "
              f"{len(config.policies)} policies, version {config.version})")
    return 1 if failed else 0


def up(args: argparse.Namespace) -> int:
    policy = Path(args.policy) if args.policy else default_policy_path()
    try:
        config = load_policy_file(policy)
    except PolicyError as error:
        print(error, file=sys.stderr)
        return 2
    refusal = open_edge_refusal(args.edge_host, config, args.allow_open_edge)
    if refusal is not None:
        print(f"gpu-router: {refusal}", file=sys.stderr)
        return 2
    try:  # the control plane would refuse to start on a pair it cannot serve
        edge_tls = _tls_pair("--edge-tls", args.edge_tls_cert, args.edge_tls_key)
        admin_tls = _tls_pair("--http-tls", args.http_tls_cert, args.http_tls_key)
    except EdgeCertificateError as error:
        print(f"gpu-router: {error}", file=sys.stderr)
        return 2
    ports = StackPorts(edge=args.edge_port, admin=args.admin_port, xds=args.xds_port,
                       ext_proc=args.ext_proc_port, control_http=args.http_port)
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="gpu-router-"))
    signals = StopSignals.install()
    stack = Stack(policy=policy, log_dir=log_dir, ports=ports, ext_proc_workers=args.workers,
                  simulators=not args.no_simulators, accounting=accounting_flags(args),
                  edge_host=args.edge_host, redis=args.redis, edge_tls=edge_tls,
                  admin_tls=admin_tls,
                  cancelled=signals.requested, certs_dir=Path(args.certs_dir))
    print(f"starting gpu-router with {policy} (logs in {log_dir}) ...", flush=True)
    try:
        stack.start()  # stops what it started if it fails or a signal cancels it
    except Cancelled:
        print(f"gpu-router: stopped by {signals.names()[0]} while starting", file=sys.stderr)
        return 0
    except (ProcessError, pki.PkiError, SecretFileError) as error:
        print(f"gpu-router: {error}", file=sys.stderr)
        return 1
    print(f"gpu-router is up: OpenAI-compatible endpoint {stack.url}/v1\n"
          f"  Envoy admin     http://127.0.0.1:{ports.admin}/stats\n"
          f"  control plane   {stack.control_url('/v1/health')} (admin token: "
          f"{stack.certs / ADMIN_TOKEN_FILE})\n"
          f"Ctrl-C (or SIGTERM, SIGHUP) stops everything; children that exit are restarted.",
          flush=True)
    supervisor = Supervisor(stack, signals)
    try:
        supervisor.run()
    finally:
        exits, errors = stack.shutdown()
        supervisor.report_stopped(exits)  # the statuses of all that stopped, first
        for error in errors:  # said here, not raised: a failing run keeps its own error
            print(f"gpu-router: could not stop: {error}", file=sys.stderr)
    return 1 if errors else 0


def certs_init(args: argparse.Namespace) -> int:
    """Make (or complete) a certs directory for a fleet, the Redis password included; valid
    files are kept as they are."""
    try:
        made = pki.ensure(Path(args.dir), fleet(args.edge, args.ext_proc, args.redis),
                          dns=[*pki.SERVER_DNS, *args.dns], ips=[*pki.SERVER_IPS, *args.ip])
        for user in (None, *args.ext_proc):
            ensure_password(Path(args.dir), user)
    except (pki.PkiError, RedisPasswordError) as error:
        print(f"gpu-router certs: {error}", file=sys.stderr)
        return 1
    for name, files in made.items():
        print(f"{name}: {files.cert} {files.key}")
    print(f"CA: {Path(args.dir) / pki.CA_FILE}")
    print(f"Redis password (PING only): {password_file(Path(args.dir))}")
    for name in args.ext_proc:
        print(f"Redis password of {name}: {password_file(Path(args.dir), name)}")
    return 0


def certs_revoke(args: argparse.Namespace) -> int:
    """Revoke certificates of a certs directory (gpu_router/revocation.py), and a replica's
    Redis password with its certificate: Redis reads no CRL."""
    directory = Path(args.dir)
    try:
        crl, revoked = revoke(directory, args.names, [Path(d) for d in args.copy_to])
    except RevocationError as error:
        print(f"gpu-router certs: {error}", file=sys.stderr)
        return 1
    for name, peer in zip(args.names, revoked, strict=True):
        print(f"revoked {name}: serial {peer.serial:x}")
    print(f"CRL: {crl} (the control plane and ext_proc read it within a second; "
          f"`certs init` or `up` issues the names new certificates)")
    replicas = [name for name, peer in zip(args.names, revoked, strict=True)
                if peer.role is pki.Role.EXT_PROC]
    for name in replicas:  # Redis reads no CRL: the user's password goes with the certificate
        try:
            password_file(directory, name).unlink(missing_ok=True)
        except OSError as error:
            print(f"gpu-router certs: {name} is revoked, but its Redis password is not: "
                  f"{error}; remove the file by hand", file=sys.stderr)
            return 1
    if replicas:
        print(f"{', '.join(replicas)}: Redis password removed (`certs init` or `up` makes a new "
              "one); Redis refuses the old one once it restarts on rules rendered anew "
              "(`gpu-router up`, or Compose's control plane, at start)")
    return 0


def _tls_pair(flag: str, cert: str | None, key: str | None) -> tuple[Path, Path] | None:
    """`flag`-cert and `flag`-key as a checked pair of absolute paths (EdgeCertificateError
    naming the file or the flag otherwise); None when neither is given."""
    if not (cert or key):
        return None
    if not (cert and key):
        raise EdgeCertificateError(f"{flag}-cert and {flag}-key go together")
    pair = (Path(cert).resolve(), Path(key).resolve())
    read_listener_certificate(*pair)
    return pair


def accounting_flags(args: argparse.Namespace) -> list[str]:
    """The control plane's ledger and audit-log flags `up` was given (none: its defaults)."""
    if args.no_accounting:
        return ["--no-accounting"]
    paths = {"--ledger": args.ledger, "--audit-log": args.audit_log}
    return [word for flag, path in paths.items() if path for word in (flag, path)]


def health(args: argparse.Namespace) -> int:
    url = f"{args.control_plane.rstrip('/')}/v1/health"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" and not is_loopback(parts.hostname or ""):
        print(f"gpu-router: {url} would carry the admin token in the clear: serve the control "
              "plane's API over HTTPS (--http-tls-cert) and give https://", file=sys.stderr)
        return 1
    try:
        context = None if args.ca is None else ssl.create_default_context(cafile=args.ca)
    except OSError as error:  # ssl.SSLError too
        print(f"gpu-router: --ca {args.ca}: not a readable PEM CA certificate ({error})",
              file=sys.stderr)
        return 1
    try:
        token = read_admin_token(Path(args.admin_token_file))
        status, body = http_get(url, headers=bearer(token), context=context)
    except SecretFileError as error:
        print(f"gpu-router: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"gpu-router: cannot reach the control plane at {url}: {error}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"gpu-router: {url} answered {status}: {body[:200]!r}", file=sys.stderr)
        return 1
    document = json.loads(body)
    print(json.dumps(document, indent=2) if args.format == "json" else render_health(document))
    return 0


def report(args: argparse.Namespace) -> int:
    try:
        print(client_report(args.ledger, args.since, args.format) if args.by == "client"
              else run_report(args.ledger, args.since, args.format))
    except ReportError as error:
        print(f"gpu-router report: {error}", file=sys.stderr)
        return 2
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="gpu-router", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    run = commands.add_parser("up", help="run Envoy, control plane, ext_proc and simulated providers")
    run.add_argument("--policy", help="policy YAML (default: the embedded default policy)")
    run.add_argument("--workers", type=int, default=1, help="ext_proc worker processes")
    run.add_argument("--no-simulators", action="store_true", help="do not start simulated providers")
    run.add_argument("--log-dir", help="where child process logs go (default: a new temp dir)")
    run.add_argument("--ledger", help="the control plane's SQLite usage ledger (default: its own)")
    run.add_argument("--audit-log", help="also write the audit trail to this file (default: none; "
                     "`gpu-router audit` renders it from the ledger)")
    run.add_argument("--no-accounting", action="store_true", help="keep no ledger and no audit trail")
    run.add_argument("--certs-dir", default=str(default_certs_dir()),
                     help="CA and certificates for mutual TLS with the control plane, made when "
                     "absent, kept when valid (default: %(default)s)")
    defaults = StackPorts()
    run.add_argument("--edge-host", default="127.0.0.1",
                     help="edge listener address; beyond loopback only with clients declared "
                     "in the policy or --allow-open-edge")
    run.add_argument("--allow-open-edge", action="store_true",
                     help="bind the edge beyond loopback although the policy declares no clients")
    run.add_argument("--edge-tls-cert",
                     help="PEM certificate chain every edge serves to clients: TLS only, "
                     "HTTP/1.1 and h2 (with --edge-tls-key; rotated by rewriting the files)")
    run.add_argument("--edge-tls-key", help="its PEM private key")
    run.add_argument("--http-tls-cert",
                     help="PEM certificate chain the control plane's admin API serves: HTTPS "
                     "only (with --http-tls-key; read at start)")
    run.add_argument("--http-tls-key", help="its PEM private key")
    run.add_argument("--redis", choices=("auto", "always", "never"), default="auto",
                     help="start redis-server for fleet-wide client rate limits (auto: when "
                     "the policy at start gives some client a limit)")
    run.add_argument("--edge-port", type=int, default=defaults.edge)
    run.add_argument("--admin-port", type=int, default=defaults.admin)
    run.add_argument("--xds-port", type=int, default=defaults.xds)
    run.add_argument("--ext-proc-port", type=int, default=defaults.ext_proc)
    run.add_argument("--http-port", type=int, default=defaults.control_http)
    run.set_defaults(handler=up)

    certs = commands.add_parser("certs", help="the local CA and certificates of the control plane's mTLS")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True)
    init = certs_commands.add_parser("init", help="make a CA and certificates; valid ones are kept")
    init.add_argument("--dir", required=True, help="where: ca.pem, ca-key.pem, <name>.pem, <name>-key.pem")
    init.add_argument("--edge", action="append", default=[], metavar="NAME",
                      help="an edge Envoy's certificate (spiffe://gpu-router/edge/NAME); repeat")
    init.add_argument("--ext-proc", action="append", default=[], metavar="NAME",
                      help="an ext_proc replica's certificate (spiffe://gpu-router/ext-proc/NAME)")
    init.add_argument("--redis", action="append", default=[], metavar="HOST",
                      help="a Redis's server certificate for TLS to the ext_proc replicas (DNS "
                      "name HOST: what they dial)")
    init.add_argument("--dns", action="append", default=[],
                      help=f"another DNS name of the control plane (always: {', '.join(pki.SERVER_DNS)})")
    init.add_argument("--ip", action="append", default=[],
                      help=f"another IP address of the control plane (always: {', '.join(pki.SERVER_IPS)})")
    init.set_defaults(handler=certs_init)
    revoking = certs_commands.add_parser(
        "revoke", help="revoke certificates: add them to the CA's crl.pem, remove their pairs")
    revoking.add_argument("--dir", required=True, help="the certs directory (with ca-key.pem)")
    revoking.add_argument("--copy-to", action="append", default=[], metavar="DIR",
                          help="also write crl.pem into DIR (atomically), for ext_proc to read "
                          "there; repeat")
    revoking.add_argument("names", nargs="+", metavar="NAME",
                          help="a certificate's name (<NAME>.pem in --dir): an edge's node id")
    revoking.set_defaults(handler=certs_revoke)

    check = commands.add_parser("validate", help="check policy files; non-zero exit on errors")
    check.add_argument("files", nargs="+")
    check.set_defaults(handler=validate)
    show = commands.add_parser("health", help="fleet health per provider and model, from the control plane")
    show.add_argument("--control-plane", default=f"http://127.0.0.1:{defaults.control_http}")
    show.add_argument("--format", choices=("table", "json"), default="table")
    show.add_argument("--ca", help="PEM CA certificate(s) to check an https:// control plane's "
                      "certificate against (default: the system's)")
    show.add_argument("--admin-token-file", default=str(default_certs_dir() / ADMIN_TOKEN_FILE),
                      help="the control plane's admin token (default: %(default)s, where "
                      "`gpu-router up` and the control plane keep it)")
    show.set_defaults(handler=health)

    spend = commands.add_parser("report", help="spend, latency and errors per provider from the usage ledger")
    spend.add_argument("--since", default="24h", help="window ending now: 15m, 1h, 24h, 30d ...")
    spend.add_argument("--format", choices=("table", "json"), default="table")
    spend.add_argument("--ledger", default=str(default_ledger_path()), help="the SQLite usage ledger")
    spend.add_argument("--by", choices=("provider", "client"), default="provider",
                       help="one row per serving provider, or per client key")
    spend.set_defaults(handler=report)
    add_keys_command(commands)
    add_analysis_commands(commands)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    sys.exit(args.handler(args))
