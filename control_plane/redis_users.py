"""The fleet's Redis follows `gpu-router certs revoke`: a revoked ext_proc replica's Redis user is
deleted from the running Redis within a second, and its open connections with it.

Redis reads no CRL (it checks a client's certificate against the CA only), so what admits a
replica is its own user's password (gpu_router/redis_service.py), and `certs revoke` removes
that password's file. Once a second the control plane, as Redis's CONTROL_USER (which may only
list users and delete one), asks Redis for its users and deletes every replica's whose password
file is gone from the certs directory. A Redis restarted on rules rendered before the
revocation has the user back until the next look. A Redis out of reach or refusing the control
plane, or a certs directory that cannot be listed, is logged once until it mends: the rate
limits Redis holds fail open, and nothing else here waits on it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from gpu_router.pki import TlsFiles
from gpu_router.redis_client import connection_pool
from gpu_router.redis_service import CONTROL_USER, replica_users, revoked_users

log = logging.getLogger(__name__)

LOOK_EVERY_S = 1.0
TIMEOUT_S = 2.0
"""Per round trip to Redis: a frozen Redis delays only the next look."""


async def retire_revoked_users(client: Any, certs_dir: Path) -> list[str]:
    """Delete from Redis (redis-py's asyncio client, as CONTROL_USER) the replica users whose
    password file `certs_dir` no longer holds; the names deleted. OSError when the directory
    cannot be listed (nothing is deleted then)."""
    revoked = revoked_users(await client.acl_users(), replica_users(certs_dir))
    if revoked:
        await client.acl_deluser(*revoked)
    return revoked


async def follow_revocations(url: str, password: str, tls: TlsFiles | None,
                             certs_dir: Path, every_s: float = LOOK_EVERY_S) -> None:
    """Retire revoked replicas' Redis users (retire_revoked_users) every `every_s`, forever."""
    import redis.asyncio as redis  # only a control plane given --redis needs the client

    errors = (redis.RedisError, OSError, asyncio.TimeoutError)
    client = redis.Redis(connection_pool=connection_pool(
        url, user=CONTROL_USER, password=password, tls=tls, timeout_s=TIMEOUT_S,
        max_connections=1))
    failing = False
    try:
        while True:
            try:
                for name in await retire_revoked_users(client, certs_dir):
                    log.info("redis_user_removed", extra={"redis_user": name, "redis": url})
                if failing:
                    log.info("redis_users_followed_again", extra={"redis": url})
                failing = False
            except errors as error:
                if not failing:
                    log.warning("redis_users_not_followed", extra={
                        "redis": url, "error": f"{type(error).__name__}: {error}"})
                failing = True
            await asyncio.sleep(every_s)
    finally:
        await client.aclose()
