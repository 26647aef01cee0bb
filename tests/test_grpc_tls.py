"""The fleet's gRPC ports (the control plane's, ext_proc's) serve a renewed certificate from the
next connection without a restart, and a pair that does not check never: gpu_router/grpc_tls.py
on a real grpc.aio server, as both services run it."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from edge_tls_fixtures import der, reissue, served_certificate
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gpu_router import pki
from gpu_router.fleet_certs import fleet
from gpu_router.grpc_tls import channel_credentials, server_credentials
from gpu_router.processes import free_port

REPLICA = pki.Identity(pki.Role.EXT_PROC, "x1")


@asynccontextmanager
async def serving(files: pki.TlsFiles) -> AsyncIterator[int]:
    port = free_port()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_secure_port(f"127.0.0.1:{port}", server_credentials(files))
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


async def check(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return reply.status


def open_channel(port: int, client: pki.TlsFiles) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", channel_credentials(client),
        options=[("grpc.ssl_target_name_override", pki.EXT_PROC_SERVER_NAME)])


def warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the renewal warned of (an earlier test may have let INFO through to the root)."""
    return [r for r in caplog.records
            if r.name == "gpu_router.tls_renewal" and r.levelno >= logging.WARNING]


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, pki.TlsFiles]:
    return pki.ensure(tmp_path / "certs", fleet(["e1"], ["x1"]))


def test_a_renewed_pair_is_served_from_the_next_connection_and_a_bad_one_never(
        certs: dict[str, pki.TlsFiles], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    replica, edge = certs["x1"], certs["e1"]

    async def run() -> None:
        async with serving(replica) as port:
            started_with = der(replica.cert)
            assert await asyncio.to_thread(served_certificate, port, edge) == started_with
            opened_before = open_channel(port, edge)
            assert await check(opened_before) == health_pb2.HealthCheckResponse.SERVING

            reissue(replica, REPLICA)
            renewed = der(replica.cert)
            assert renewed != started_with
            assert await asyncio.to_thread(served_certificate, port, edge) == renewed
            async with open_channel(port, edge) as opened_after:
                assert await check(opened_after) == health_pb2.HealthCheckResponse.SERVING
            # The connection made before the renewal keeps its pair and goes on serving.
            assert await check(opened_before) == health_pb2.HealthCheckResponse.SERVING
            await opened_before.close()

            # A certificate whose key is not in place yet (another pair's): not served.
            reissue(replica, REPLICA)
            shutil.copy(tmp_path / "certs" / "e1-key.pem", replica.key)
            with caplog.at_level(logging.WARNING, logger="gpu_router.tls_renewal"):
                caplog.clear()
                assert await asyncio.to_thread(served_certificate, port, edge) == renewed
                assert await asyncio.to_thread(served_certificate, port, edge) == renewed
            assert [r.error for r in warnings(caplog)] == [  # once, for both connections
                f"{replica.key}: not the key of {replica.cert}"]

            # The renewal completes: served from then on.
            reissue(replica, REPLICA)
            assert await asyncio.to_thread(served_certificate, port, edge) == der(replica.cert)

    asyncio.run(run())


def test_files_missing_while_replaced_keep_the_pair_served(
        certs: dict[str, pki.TlsFiles], caplog: pytest.LogCaptureFixture) -> None:
    replica, edge = certs["x1"], certs["e1"]

    async def run() -> None:
        async with serving(replica) as port:
            started_with = der(replica.cert)
            kept = replica.key.read_bytes()
            replica.key.unlink()
            with caplog.at_level(logging.WARNING, logger="gpu_router.tls_renewal"):
                assert await asyncio.to_thread(served_certificate, port, edge) == started_with
            assert [r.message for r in warnings(caplog)] == ["tls_rejected"]
            replica.key.write_bytes(kept)
            replica.key.chmod(0o600)
            assert await asyncio.to_thread(served_certificate, port, edge) == started_with

    asyncio.run(run())
