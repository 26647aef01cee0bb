"""`python -m ext_proc.healthcheck [HOST:PORT] --tls-ca CA --tls-cert CERT --tls-key KEY`: exit 0
when the ext_proc replica there answers SERVING to grpc.health.v1 (it holds a routing policy
and the CRL), 1 otherwise, with the reason on stderr.

The same check Envoy makes, for container health checks (docker-compose.yml): a TCP connect
would pass for a replica that is frozen or has no policy yet. The port takes mutual TLS only:
the check presents a certificate of the fleet's CA (the replica's own will do: the health
service answers any role, only decisions are for edges) and checks the replica's by its
EXT_PROC_SERVER_NAME.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpu_router.grpc_tls import channel_credentials
from gpu_router.pki import EXT_PROC_SERVER_NAME, TlsFiles

EXT_PROC_SERVICE = ext_proc_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
"""The service name Envoy's gRPC health check asks about (ext_proc/serving_status.py reports it).
Defined here so the check imports nothing of ext_proc's own state."""

DEFAULT_TARGET = "127.0.0.1:50051"
TIMEOUT_S = 2.0


def channel(target: str, files: TlsFiles) -> grpc.Channel:
    """A mutual-TLS channel to the ext_proc replica at `target`, as the holder of `files`."""
    return grpc.secure_channel(
        target, channel_credentials(files), options=[("grpc.ssl_target_name_override", EXT_PROC_SERVER_NAME)]
    )


def serving(target: str, files: TlsFiles, timeout_s: float = TIMEOUT_S) -> tuple[bool, str]:
    """(True, "SERVING") when the replica at `target` serves; else (False, why)."""
    with channel(target, files) as channel_:
        try:
            answer = health_pb2_grpc.HealthStub(channel_).Check(
                health_pb2.HealthCheckRequest(service=EXT_PROC_SERVICE), timeout=timeout_s
            )
        except grpc.RpcError as error:
            return False, f"{error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    return answer.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ext_proc.healthcheck", description=__doc__)
    parser.add_argument("target", nargs="?", default=DEFAULT_TARGET, help="HOST:PORT")
    parser.add_argument("--tls-ca", type=Path, required=True, help="the fleet's CA (PEM)")
    parser.add_argument("--tls-cert", type=Path, required=True,
                        help="a certificate of that CA (the replica's own)")
    parser.add_argument("--tls-key", type=Path, required=True, help="its private key")
    args = parser.parse_args(argv)
    try:
        ok, status = serving(args.target, TlsFiles(args.tls_ca, args.tls_cert, args.tls_key))
    except OSError as error:
        print(f"cannot read the TLS files: {error}", file=sys.stderr)
        return 2
    if not ok:
        print(f"ext_proc at {args.target} is not serving: {status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
