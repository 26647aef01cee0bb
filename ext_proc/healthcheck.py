"""`python -m ext_proc.healthcheck [HOST:PORT]`: exit 0 when the ext_proc replica there answers
SERVING to grpc.health.v1 (it holds a routing policy), 1 otherwise, with the reason on stderr.

The same check Envoy makes, for container health checks (docker-compose.yml): a TCP connect
would pass for a replica that is frozen or has no policy yet.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXT_PROC_SERVICE = ext_proc_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
"""The service name Envoy's gRPC health check asks about (ext_proc/serving_status.py reports it).
Defined here so the check imports nothing of ext_proc's own state."""

DEFAULT_TARGET = "127.0.0.1:50051"
TIMEOUT_S = 2.0


def serving(target: str, timeout_s: float = TIMEOUT_S) -> tuple[bool, str]:
    """(True, "SERVING") when the replica at `target` serves; else (False, why)."""
    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=EXT_PROC_SERVICE), timeout=timeout_s
            )
        except grpc.RpcError as error:
            return False, f"{error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    return answer.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    target = args[0] if args else DEFAULT_TARGET
    ok, status = serving(target)
    if not ok:
        print(f"ext_proc at {target} is not serving: {status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
