"""Redis over mutual TLS, as Compose runs it between the ext_proc replicas and Redis: a real
redis-server with a certificate from `certs init --redis`, the replicas' own certificates."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from edge_tls_fixtures import reissue
from redis.backoff import NoBackoff
from redis.retry import Retry

from ext_proc.rate_limit import (
    POOL_CONNECTIONS,
    RETRY_REDIS_S,
    Charge,
    RateLimiter,
    RedisCounters,
)
from gpu_router import pki
from gpu_router.processes import ManagedProcess, free_port, port_open
from gpu_router.redis_client import connection_pool
from gpu_router.redis_service import access_rules, password_file, read_password

REPLICA = "ext-proc"
OBSERVER = "the-tests-own-password-0123456789"
"""A second user, the test's, which may read Redis's client list (the fleet's may not)."""


def password(certs: dict[str, pki.TlsFiles]) -> str:
    """The replica's Redis password (access_rules made it beside the certificates)."""
    return read_password(password_file(certs[REPLICA].ca.parent, REPLICA))


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, dict[str, pki.TlsFiles]]]:
    """A redis-server taking TLS only, with client certificates of the fleet's CA: (port,
    the certs: "localhost" Redis's, "ext-proc" a replica's)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it on Debian)")
    # Named localhost, which only a test may (certs init refuses it: the control plane's).
    certs = pki.ensure(tmp_path / "certs", [pki.Identity(pki.Role.REDIS, "localhost"),
                                            pki.Identity(pki.Role.EXT_PROC, "ext-proc")])
    served = certs["localhost"]
    port = free_port()
    config = tmp_path / "redis.conf"
    config.write_text(
        f"port 0\ntls-port {port}\nbind 127.0.0.1\ntls-cert-file {served.cert}\n"
        f"tls-key-file {served.key}\ntls-ca-cert-file {served.ca}\ntls-auth-clients yes\n"
        f"{access_rules(tmp_path / 'certs', [REPLICA])}user observer on >{OBSERVER} ~* +@all\n"
        f"save \"\"\nappendonly no\ndir {tmp_path}\n")
    server = ManagedProcess("redis", ["redis-server", str(config)], tmp_path / "redis.log").start()
    try:
        server.wait_until(lambda: port_open(port), "redis-server to listen")
        yield port, certs
    finally:
        server.stop()


def test_replicas_share_counters_over_tls_and_their_certificate(
    tls_redis: tuple[int, dict[str, pki.TlsFiles]], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every connection on the one SSL context the replica made: none builds its own from the
    system's CA store (~50 ms on the event loop each, which stalled every stream of the worker
    as its pool grew), so that store cannot vouch for a Redis either."""
    port, certs = tls_redis

    def per_connection(*args: object, **kwargs: object) -> ssl.SSLContext:
        raise AssertionError("an SSL context made per connection")

    monkeypatch.setattr(ssl, "create_default_context", per_connection)

    async def connected(counters: RedisCounters, now: list[float]) -> RedisCounters:
        """Once its pool holds a connection: a first TLS handshake may outlast the 50 ms a
        round trip gets (it then fails open for a second, as in production)."""
        for _ in range(20):
            if await counters.add(0, [Charge("tls:warm", 1, 1000)]) is not None:
                return counters
            now[0] += RETRY_REDIS_S
        raise AssertionError("no round trip to Redis over TLS")

    async def waits() -> tuple[list[float | None], bool]:
        url = f"rediss://localhost:{port}"
        now = [0.0]
        one, two = [await connected(RedisCounters(url, lambda: now[0], user=REPLICA,
                                                  password=password(certs),
                                                  tls=certs["ext-proc"]), now)
                    for _ in range(2)]
        limit = [Charge("tls:req", 1, 2)]
        found = [await RateLimiter(counters, clock=lambda: 600.0).retry_after(limit)
                 for counters in (one, two, one)]
        # The same server dialled by an address its certificate does not name: refused (the
        # replica then fails open), where the name it does carry connected above.
        elsewhere = RedisCounters(f"rediss://127.0.0.1:{port}", lambda: now[0],
                                  user=REPLICA, password=password(certs),
                                  tls=certs["ext-proc"])
        try:
            await connected(elsewhere, now)
        except AssertionError:
            refused = True
        else:
            refused = False
        for counters in (one, two, elsewhere):
            await counters.close()
        return found, refused

    with caplog.at_level(logging.WARNING, logger="ext_proc.rate_limit"):
        found, refused = asyncio.run(waits())
    assert found == [None, None, 60]  # the third is over the shared limit
    assert refused
    # For the name, not for any failure to connect: the handshake checked Redis's certificate.
    errors = [getattr(record, "error", "") for record in caplog.records]
    assert any("certificate verify failed" in error for error in errors), errors


def test_a_worker_connects_at_start_and_a_burst_shares_its_connections(
    tls_redis: tuple[int, dict[str, pki.TlsFiles]],
) -> None:
    """The worker's connections are open before its first limited request, and 64 requests at
    once share them: a connection per request (64 TLS handshakes at once) outlasted the round
    trip's 50 ms and failed the limits open for a second."""
    port, certs = tls_redis
    probe = redis.Redis(host="localhost", port=port, username="observer", password=OBSERVER,
                        ssl=True,
                        ssl_ca_certs=str(certs["ext-proc"].ca),
                        ssl_certfile=str(certs["ext-proc"].cert),
                        ssl_keyfile=str(certs["ext-proc"].key), socket_timeout=5)

    def worker_connections() -> int:
        return int(probe.info("clients")["connected_clients"]) - 1  # the probe's own

    async def burst() -> tuple[int, int, list[list[tuple[int, int]] | None]]:
        counters = RedisCounters(f"rediss://localhost:{port}", user=REPLICA,
                                 password=password(certs),
                                 tls=certs["ext-proc"])
        try:
            await counters.warm()
            warmed = worker_connections()
            added = await asyncio.gather(*(counters.add(7, [Charge(f"burst:{i}", 1, 1000)])
                                           for i in range(64)))
            return warmed, worker_connections(), added
        finally:
            await counters.close()

    try:
        warmed, after, added = asyncio.run(burst())
    finally:
        probe.close()
    # A request that outlasts its round trip closes its connection: at most the pool's, after.
    assert warmed == POOL_CONNECTIONS and after <= POOL_CONNECTIONS
    assert [counts for counts in added if counts is not None]  # the burst reached Redis


@pytest.mark.parametrize("command", [("FLUSHALL",), ("CONFIG", "SET", "dir", "/tmp"),
                                     ("SET", "gpu-router:rl:x:1", "0"), ("GET", "elsewhere"),
                                     ("KEYS", "*"), ("EVAL", "return 1", "0"),
                                     ("SCRIPT", "FLUSH"), ("MODULE", "LIST")])
def test_the_password_runs_the_counters_commands_only(
    tls_redis: tuple[int, dict[str, pki.TlsFiles]], command: tuple[str, ...],
) -> None:
    """A replica's password, stolen: it may move counters, not turn Redis into a file writer
    (CONFIG SET dir, then SAVE), wipe it, or read other keys."""
    port, certs = tls_redis
    replica = certs["ext-proc"]
    client = redis.Redis(host="localhost", port=port, username=REPLICA,
                         password=password(certs), ssl=True,
                         ssl_ca_certs=str(replica.ca), ssl_certfile=str(replica.cert),
                         ssl_keyfile=str(replica.key), socket_timeout=5)
    try:
        assert client.incrby("gpu-router:rl:x:1", 1) == 1  # what the counters send
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    finally:
        client.close()


@pytest.mark.parametrize("how", ["plaintext", "no client certificate", "another CA's"])
def test_redis_refuses_what_is_not_the_fleets_tls(
    tls_redis: tuple[int, dict[str, pki.TlsFiles]], how: str, tmp_path: Path,
) -> None:
    """The password alone is not enough: TLS, with a client certificate of the fleet's CA."""
    port, certs = tls_redis
    replica = certs["ext-proc"]
    stranger = pki.ensure(tmp_path / "other", [pki.Identity(pki.Role.EXT_PROC, "x")])["x"]
    options = {
        "plaintext": {"host": "localhost"},
        "no client certificate": {"host": "localhost", "ssl": True,
                                  "ssl_ca_certs": str(replica.ca)},
        "another CA's": {"host": "localhost", "ssl": True, "ssl_ca_certs": str(replica.ca),
                         "ssl_certfile": str(stranger.cert), "ssl_keyfile": str(stranger.key)},
    }[how]
    client = redis.Redis(port=port, username=REPLICA, password=password(certs), socket_timeout=5,
                         retry=Retry(NoBackoff(), 0), **options)  # refused once is enough
    with pytest.raises(redis.ConnectionError):
        client.ping()
    client.close()
    ok = redis.Redis(host="localhost", port=port, username=REPLICA, password=password(certs),
                     ssl=True,
                     ssl_ca_certs=str(replica.ca), ssl_certfile=str(replica.cert),
                     ssl_keyfile=str(replica.key), socket_timeout=5)
    assert ok.ping()  # the same server, the replica's way
    ok.close()


def test_a_renewed_certificate_is_presented_from_the_next_connection(tmp_path: Path) -> None:
    """The pool's connections present the pair the files hold as each is made, without a
    restart (Redis does not show a client's certificate: a TLS server of the test's own, asking
    for the fleet's, records each one it is shown)."""
    certs = pki.ensure(tmp_path / "certs", [pki.Identity(pki.Role.REDIS, "localhost"),
                                            pki.Identity(pki.Role.EXT_PROC, "ext-proc")])
    served, replica = certs["localhost"], certs["ext-proc"]
    shown: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        shown.append(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        writer.close()

    async def connect_once(pool: Any) -> None:
        connection = pool.connection_class(**pool.connection_kwargs)
        with contextlib.suppress(redis.RedisError, OSError):  # the server hangs up: recorded
            await connection.connect()
        await connection.disconnect()

    async def run() -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(served.ca))
        context.load_cert_chain(served.cert, served.key)
        context.verify_mode = ssl.CERT_REQUIRED
        server = await asyncio.start_server(record, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        pool = connection_pool(f"rediss://localhost:{port}", user=None, password=None,
                               tls=replica, timeout_s=5, max_connections=2)
        try:
            await connect_once(pool)
            reissue(replica, pki.Identity(pki.Role.EXT_PROC, "ext-proc"))
            await connect_once(pool)
        finally:
            server.close()
            await server.wait_closed()

    before = ssl.PEM_cert_to_DER_cert(replica.cert.read_text())
    asyncio.run(run())
    assert shown == [before, ssl.PEM_cert_to_DER_cert(replica.cert.read_text())]
    assert shown[0] != shown[1]
