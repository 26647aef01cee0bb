"""python -m ext_proc: the Envoy external processor that picks a provider per request."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ext_proc.json_log import configure_logging
from ext_proc.workers import WorkerConfig, run_workers
from gpu_router.pki import Role, TlsFiles, certified_peer, pair_problem
from gpu_router.redis_client import redis_url_problem
from gpu_router.redis_service import RedisPasswordError, read_password
from gpu_router.revocation import RevocationError, Revocations

LOG_LEVELS = ("debug", "info", "warning", "error")


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return text


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ext_proc", description=__doc__)
    parser.add_argument(
        "--listen",
        type=_address,
        default="127.0.0.1:50051",
        help="ExternalProcessor gRPC address (default %(default)s)",
    )
    parser.add_argument(
        "--xds",
        type=_address,
        default="127.0.0.1:18000",
        help="control plane ADS address, mutual TLS (default %(default)s)",
    )
    parser.add_argument("--tls-ca", type=Path, required=True,
                        help="CA certificate (PEM) the control plane's certificate chains to")
    parser.add_argument("--tls-cert", type=Path, required=True,
                        help="this replica's certificate (SAN spiffe://gpu-router/ext-proc/<name>)")
    parser.add_argument("--tls-key", type=Path, required=True, help="its private key")
    parser.add_argument("--tls-crl", type=Path,
                        help="a copy of the fleet's CRL (crl.pem, `gpu-router certs revoke`), "
                        "read again when it changes: an edge whose certificate it revokes is "
                        "refused even while the control plane, which sends its CRL over xDS, is "
                        "out of reach (default: the control plane's only)")
    parser.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="processes sharing the port with SO_REUSEPORT (default %(default)s)",
    )
    parser.add_argument(
        "--redis",
        help="redis://HOST:PORT, rediss://HOST:PORT (TLS, with this replica's --tls-* files) "
        "or unix:///PATH/redis.sock, shared by every replica for fleet-wide client rate "
        "limits (default: counters in each worker process)",
    )
    parser.add_argument(
        "--redis-password-file", type=Path,
        help="file holding the password Redis asks before any command (never on the command "
        "line, which every local user can read)",
    )
    parser.add_argument(
        "--redis-user",
        help="the Redis user that password is for (default: the replica the --tls-cert names, "
        "as `gpu-router up` and Compose make Redis's users; `default` for a Redis with only "
        "requirepass)",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="warning")
    args = parser.parse_args(argv)
    if args.redis is None and (args.redis_password_file is not None
                               or args.redis_user is not None):
        parser.error("--redis-password-file and --redis-user need --redis")
    if args.redis_user is not None and (not args.redis_user or args.redis_password_file is None):
        parser.error("--redis-user needs a name, and its password in --redis-password-file")
    redis_problem = None if args.redis is None else redis_url_problem(
        args.redis, "give it as --redis-user, with --redis-password-file")
    if redis_problem is not None:
        parser.error(redis_problem)
    tls = TlsFiles(args.tls_ca, args.tls_cert, args.tls_key)
    problem = pair_problem(tls)
    if problem is not None:  # else gRPC only says it cannot bind the port
        parser.error(f"unusable TLS files: {problem}")
    try:
        Revocations.open(args.tls_crl, args.tls_ca)  # each worker reads it again
    except RevocationError as error:
        parser.error(str(error))
    try:
        password = (None if args.redis_password_file is None
                    else read_password(args.redis_password_file))
    except RedisPasswordError as error:
        parser.error(str(error))
    user = args.redis_user
    if user is None and password is not None:
        replica = certified_peer(tls.cert.read_bytes())
        if replica is None or replica.role is not Role.EXT_PROC:
            parser.error(f"{tls.cert} names no ext_proc replica: give --redis-user")
        user = replica.name
    configure_logging(args.log_level)
    return run_workers(
        WorkerConfig(
            listen=args.listen, xds=args.xds, log_level=args.log_level,
            tls=tls, crl=args.tls_crl, redis=args.redis,
            redis_user=user, redis_password=password,
        ),
        args.workers,
    )


if __name__ == "__main__":
    sys.exit(main())
