"""The fleet's Redis follows `gpu-router certs revoke`: a revoked ext_proc replica's Redis user is
deleted from the running Redis within a second, and its open connections with it.

Redis reads no CRL (it checks a client's certificate against the CA only), so what admits a
replica is its own user's password (gpu_router/redis_service.py). `certs revoke` removes that
password's file; the next `certs init` or `up` makes a new one, which Redis takes once restarted
on the rules rendered then. So once a second the control plane, as Redis's CONTROL_USER (which
may only list users and delete one), asks Redis for its users and keeps a replica's only while
the password in the replica's file still opens it (a login of its own): a user whose file is
gone, or holds a password Redis does not know, is deleted. Whichever came first, the
revocation or the new password; whether Redis or the control plane was away meanwhile; and a
Redis respawned on rules older than the revocation loses the user again at the next look.

The passwords are the certs directory's, as is the control plane's own (by default): Redis
taking that one says the directory is the one its rules were rendered from. A directory that
cannot be listed deletes nobody (a lost mount is not every replica revoked). A Redis out of
reach or refusing the control plane, or such a directory, is logged once until it mends: the
rate limits Redis holds fail open, and nothing else here waits on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gpu_router.pki import TlsFiles
from gpu_router.redis_client import connection_pool
from gpu_router.redis_service import CONTROL_USER, replica_passwords, replica_users

log = logging.getLogger(__name__)

LOOK_EVERY_S = 1.0
TIMEOUT_S = 2.0
"""Per round trip to Redis: a frozen Redis delays only the next look."""

Opens = Callable[[str, str], Awaitable[bool]]
"""Whether Redis lets this user in with this password (raises when Redis cannot be asked)."""


async def retire_revoked_users(client: Any, certs_dir: Path, opens: Opens) -> list[str]:
    """Delete from Redis (redis-py's asyncio client, as CONTROL_USER) the replica users whose
    password in `certs_dir` is missing or does not open them; the names deleted. OSError when
    the directory cannot be listed (nothing is deleted then)."""
    passwords = replica_passwords(certs_dir)
    revoked = [user for user in replica_users(await client.acl_users())
               if user not in passwords or not await opens(user, passwords[user])]
    if revoked:
        await client.acl_deluser(*revoked)
    return revoked


def _pool(url: str, tls: TlsFiles | None, user: str, password: str) -> Any:
    return connection_pool(url, user=user, password=password, tls=tls, timeout_s=TIMEOUT_S,
                           max_connections=1)


def logins(url: str, tls: TlsFiles | None, control_password: str) -> Opens:
    """Opens for the Redis at `url`: per login a connection of its own, made as CONTROL_USER,
    which then sends AUTH as the replica itself (redis-py reports a refused AUTH on connecting
    as any failure to connect), closed after."""
    import redis.asyncio as redis

    async def opens(user: str, password: str) -> bool:
        connection = _pool(url, tls, CONTROL_USER, control_password).make_connection()
        try:
            await connection.connect()
            await connection.send_command("AUTH", user, password)
            return bool(await connection.read_response() == b"OK")
        except redis.AuthenticationError:
            return False
        finally:
            await connection.disconnect()

    return opens


async def follow_revocations(url: str, password: str, tls: TlsFiles | None,
                             certs_dir: Path, every_s: float = LOOK_EVERY_S) -> None:
    """Retire revoked replicas' Redis users (retire_revoked_users) every `every_s`, until
    cancelled. A cancel that lands while redis-py awaits asyncio.wait_for on a send that has just
    finished is swallowed there (CPython 3.11, gh-86296; 3 of 25 runs of its test hung), so the
    loop asks its task after each look: the control plane's stop waits for this task."""
    import redis.asyncio as redis  # only a control plane given --redis needs the client

    errors = (redis.RedisError, OSError, asyncio.TimeoutError)
    opens = logins(url, tls, password)
    own = _pool(url, tls, CONTROL_USER, password)
    client = redis.Redis(connection_pool=own)
    task = asyncio.current_task()
    failing = False
    try:
        while True:
            try:
                for name in await retire_revoked_users(client, certs_dir, opens):
                    log.info("redis_user_removed", extra={"redis_user": name, "redis": url})
                if failing:
                    log.info("redis_users_followed_again", extra={"redis": url})
                failing = False
            except errors as error:
                if not failing:
                    log.warning("redis_users_not_followed", extra={
                        "redis": url, "error": f"{type(error).__name__}: {error}"})
                failing = True
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            await asyncio.sleep(every_s)
    finally:
        await own.disconnect()
