"""A launcher-made redis-server for tests (gpu_router/redis_service.py), as the stack runs it."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from polling import eventually

from gpu_router.redis_service import (
    access_rules,
    ensure_password,
    redis_answers,
    redis_home,
    redis_process,
    redis_socket,
    remove_redis_home,
)


@contextlib.contextmanager
def running_redis(certs: Path, log_dir: Path, replicas: Iterable[str]
                  ) -> Iterator[tuple[Path, str, int]]:
    """redis-server with the users of `replicas` (their passwords in `certs`): (its directory,
    the default user's password, pid). Skips the test without redis-server."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it on Debian)")
    password = ensure_password(certs)
    home = redis_home(certs)
    try:
        process = redis_process(home, log_dir, access_rules(certs, replicas)).start()
        try:
            eventually(lambda: redis_answers(redis_socket(home), password),
                       "redis-server to answer PING")
            yield home, password, process.pid
        finally:
            process.stop()
    finally:
        remove_redis_home(home)
