"""Revoking an ext_proc replica's certificate while a stack runs: the control plane sends the
fleet's CRL to every edge with the ext_proc cluster, and each edge's TLS handshake to the
revoked replica fails, so requests go on along the fallback routes, until the replica runs on a
new certificate; the control plane refuses the revoked one too, and deletes its user from the
fleet's Redis. (An edge certificate's revocation: test_security.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from polling import eventually
from stack_harness import (
    BATCH,
    CLI,
    CLIENTS,
    MODEL,
    Traffic,
    default_stack,
    reason,
)

from control_plane.translate.fallback_routes import FALLBACK_REASON
from gpu_router import pki
from gpu_router.redis_service import ensure_password, password_file, read_password
from gpu_router.stack import Stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The default policy's stack, with the fleet's Redis (the replica is a user there) where
    redis-server is installed (.ci/run installs it)."""
    redis = "always" if shutil.which("redis-server") else "never"
    with default_stack(tmp_path_factory.mktemp("stack"), redis=redis) as running:
        yield running


def removed_redis_users(stack: Stack) -> list[str]:
    lines = stack.processes["control-plane"].log_path.read_text().splitlines()
    return [json.loads(line)["redis_user"] for line in lines if '"redis_user_removed"' in line]


def redis_login(stack: Stack, user: str, password: str) -> str:
    """What Redis answers `user`'s AUTH with this password: PONG or the error's kind."""
    assert stack.redis_dir is not None
    try:
        with redis.Redis(unix_socket_path=str(stack.redis_dir / "redis.sock"), username=user,
                         password=password, socket_timeout=5) as client:
            return "PONG" if client.ping() else "no answer"
    except redis.RedisError as error:
        return type(error).__name__


def test_a_revoked_ext_proc_certificate_fails_every_edges_handshake(stack: Stack) -> None:
    """With 64 clients sending throughout: not one of their requests fails, from before the
    revocation through the fallback to the replica's return on a new certificate."""
    assert reason(stack) != FALLBACK_REASON  # ext_proc decides
    password = read_password(password_file(stack.certs, "ext-proc-1"))
    if stack.redis_dir is not None:
        assert redis_login(stack, "ext-proc-1", password) == "PONG"
    with Traffic(stack, MODEL, BATCH, threads=CLIENTS) as traffic:
        result = subprocess.run(
            [*CLI, "certs", "revoke", "--dir", str(stack.certs), "ext-proc-1"],
            capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        # The replica still runs, with the certificate it loaded at start; the edge refuses it.
        eventually(lambda: reason(stack) == FALLBACK_REASON, "the edge to stop asking ext_proc")
        lines = stack.processes["control-plane"].log_path.read_text().splitlines()
        refused = [json.loads(line) for line in lines if '"peer_refused"' in line]
        assert {(entry["peer_name"], entry["reason"]) for entry in refused} == {
            ("ext-proc-1", "the client certificate is revoked")}
        if stack.redis_dir is not None:  # Redis reads no CRL: the control plane deletes the user
            eventually(lambda: redis_login(stack, "ext-proc-1", password) == "AuthenticationError",
                       "Redis to refuse the revoked replica's password")
            eventually(lambda: removed_redis_users(stack) == ["ext-proc-1"],
                       "the control plane to log the user it deleted")
        # The same CRL passes a replica whose certificate it does not name: the replica
        # restarted with a new one (as the next `up` issues it) decides again.
        stack.tls(pki.Role.EXT_PROC, "ext-proc-1")
        ensure_password(stack.certs, "ext-proc-1")  # Redis takes it once restarted on it
        stack.restart("ext-proc-1")
        eventually(lambda: reason(stack) != FALLBACK_REASON, "ext_proc to decide again")
        decided_again = time.monotonic()
        eventually(lambda: len(traffic.sent_after(decided_again)) >= CLIENTS,
                   "the clients to go on")
    assert traffic.failures() == {}, traffic.failed
    before = {e.reason for e in traffic.exchanges if e.sent_at <= decided_again}
    assert FALLBACK_REASON in before, "the clients saw the fallback"
    after = traffic.sent_after(decided_again)
    assert [e for e in after if e.reason == FALLBACK_REASON] == [], "then ext_proc, all of them"
