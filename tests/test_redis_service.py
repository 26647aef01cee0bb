"""The fleet's Redis (gpu_router/redis_service.py): no command before AUTH, a user per ext_proc
replica whose password travels only in files and goes with its certificate; and ext_proc's
flags for it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from ext_proc_fixtures import FakeAds
from polling import eventually
from redis_fixtures import running_redis

from control_plane.policy.load import default_policy_path
from ext_proc.__main__ import main as ext_proc_main
from ext_proc.rate_limit import RETRY_REDIS_S, Charge, RateLimiter, RedisCounters
from gpu_router import pki
from gpu_router.cli import main as cli_main
from gpu_router.redis_service import (
    PASSWORD_FILE,
    RedisPasswordError,
    access_rules,
    ensure_password,
    password_file,
    read_password,
    redis_answers,
    redis_home,
    redis_process,
    redis_socket,
    redis_url,
    remove_redis_home,
)
from gpu_router.stack import Stack, StackPorts

REPLICAS = ("ext-proc-1", "ext-proc-2")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[Path, str, int]]:
    """A launcher-made redis-server with the users of REPLICAS (their passwords in
    tmp_path/certs): (its directory, the default user's password, pid)."""
    with running_redis(tmp_path / "certs", tmp_path, REPLICAS) as running:
        yield running


def tcp_listeners(pid: int) -> list[str]:
    """The TCP sockets (IPv4 and IPv6) `pid` listens on, as /proc/net/tcp* lines."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            inodes.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed since the listing: a client Redis let go, no listener
            continue
    listening = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and f"socket:[{fields[9]}]" in inodes:  # 0A: LISTEN
                listening.append(line)
    return listening


def test_redis_takes_no_command_before_the_fleets_password(
    redis_server: tuple[Path, str, int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone else who reached it could reset the counters (escape a limit) or raise them."""
    home, password, pid = redis_server
    with socket.socket(socket.AF_UNIX) as connection:
        connection.settimeout(5)
        connection.connect(str(redis_socket(home)))
        connection.sendall(b"SET gpu-router:rl:x 1\r\n")
        assert connection.recv(64).startswith(b"-NOAUTH")
    assert not redis_answers(redis_socket(home), "not-the-fleets-password")
    assert redis_answers(redis_socket(home), password)
    # Only on a socket in a directory only this user may enter: a TCP port picked free could be
    # anyone's by the time the password is sent to it.
    assert tcp_listeners(pid) == []
    assert home.stat().st_mode & 0o777 == 0o700
    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"redis-server" in argv and password.encode() not in argv, "never on a command line"
    assert (home / "redis.conf").stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("redis*.conf")), "not in the log directory"
    assert (tmp_path / "certs" / PASSWORD_FILE).stat().st_mode & 0o777 == 0o600
    assert ensure_password(tmp_path / "certs") == password, "kept"

    async def without_password() -> list[tuple[int, int]] | None:
        counters = RedisCounters(redis_url(home))
        try:
            return await counters.add(600, [Charge("shared:req", 1, 3)])
        finally:
            await counters.close()

    assert asyncio.run(without_password()) is None  # refused: counted nowhere (fails open)
    [warning] = [r for r in caplog.records if r.getMessage().startswith("rate-limit store")]
    # Names the error and its message (redis-py 8's repr of an error names only a category).
    kind, _, message = warning.error.partition(": ")  # type: ignore[attr-defined]
    assert kind == "ConnectionError" and message


def test_each_replica_is_a_redis_user_of_its_own_and_revoking_one_retires_its_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Redis reads no CRL: a replica's password goes with its certificate, so a Redis started
    on the rules rendered after `certs revoke` and `certs init` refuses the revoked replica's
    old password and takes its new one, while the other replica's stays as it was. No
    replica's password is another's, and the default user's only PINGs."""
    certs = tmp_path / "certs"
    init = ["certs", "init", "--dir", str(certs), *(f"--ext-proc={name}" for name in REPLICAS)]

    def command(argv: list[str]) -> None:
        with pytest.raises(SystemExit) as done:
            cli_main(argv)
        assert done.value.code == 0, capsys.readouterr().err

    command(init)
    old = {name: read_password(password_file(certs, name)) for name in REPLICAS}
    command(["certs", "revoke", "--dir", str(certs), "ext-proc-1"])
    command(init)
    new = {name: read_password(password_file(certs, name)) for name in REPLICAS}
    assert new["ext-proc-2"] == old["ext-proc-2"] and new["ext-proc-1"] != old["ext-proc-1"]
    capsys.readouterr()
    default = read_password(password_file(certs))
    home = redis_home(certs)
    process = redis_process(home, tmp_path, access_rules(certs, REPLICAS)).start()

    def counting(user: str, password: str) -> str:
        try:
            with redis.Redis(unix_socket_path=str(redis_socket(home)), username=user,
                             password=password, socket_timeout=5) as client:
                client.incrby("gpu-router:rl:users:1", 1)
        except redis.RedisError as error:
            return type(error).__name__
        return "counted"

    try:
        eventually(lambda: redis_answers(redis_socket(home), default), "redis-server to answer")
        assert counting("ext-proc-1", old["ext-proc-1"]) == "AuthenticationError"
        assert counting("ext-proc-1", new["ext-proc-1"]) == "counted"
        assert counting("ext-proc-2", old["ext-proc-2"]) == "counted"
        assert counting("ext-proc-1", new["ext-proc-2"]) == "AuthenticationError"
        assert counting("default", default) == "NoPermissionError"
    finally:
        process.stop()
        remove_redis_home(home)


@pytest.mark.parametrize("text", ["", "short", "has space in it, long enough", "quo\"te-long-enough"])
def test_an_unusable_redis_password_file_is_an_error_naming_it(tmp_path: Path, text: str) -> None:
    path = tmp_path / PASSWORD_FILE
    path.write_text(text)
    with pytest.raises(RedisPasswordError, match=str(path)):
        read_password(path)


def test_redis_counters_are_shared_and_a_lost_redis_fails_open(
    redis_server: tuple[Path, str, int], tmp_path: Path
) -> None:
    home, _, _ = redis_server

    async def scenario() -> tuple[list[float | None], float | None, float | None]:
        url = redis_url(home)
        # two replicas, each its own user, one store
        one, two = (RedisCounters(url, user=name, password=read_password(
            password_file(tmp_path / "certs", name))) for name in REPLICAS)
        limit = [Charge("shared:req", 1, 3)]
        waits = []
        for counters in (one, two, one, two, one):
            waits.append(await RateLimiter(counters, clock=lambda: 600.0).retry_after(limit))
        unreachable = RedisCounters("redis://127.0.0.1:1")
        open_wait = await RateLimiter(unreachable, clock=lambda: 600.0).retry_after(limit)
        later = await RateLimiter(two, clock=lambda: 690.0).retry_after(limit)
        for counters in (one, two, unreachable):
            await counters.close()
        return waits, open_wait, later

    waits, open_wait, later = asyncio.run(scenario())
    assert waits[:3] == [None, None, None] and waits[3] == waits[4] == 60
    assert open_wait is None  # limits fail open; budgets do not depend on Redis
    assert later is None


def test_a_frozen_redis_is_one_warning_per_outage_and_one_when_it_ends(
    redis_server: tuple[Path, str, int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGSTOP: each try waits out one round trip and fails open; tries a second apart during
    the outage warn once, and while one is out the others pass at once (one request a retry
    pays the wait); the first that counts again says so."""
    home, _, pid = redis_server
    now = [600.0]

    def at_once(coroutine: Coroutine[Any, Any, Any]) -> Any:
        """The coroutine's value, which it must return without waiting for anything."""
        try:
            coroutine.send(None)
        except StopIteration as returned:
            return returned.value
        coroutine.close()
        raise AssertionError("it waited")

    async def scenario() -> list[list[tuple[int, int]] | None]:
        counters = RedisCounters(redis_url(home), clock=lambda: now[0], user="ext-proc-1",
                                 password=read_password(password_file(tmp_path / "certs",
                                                                      "ext-proc-1")))
        charge = [Charge("outage:req", 1, 100)]
        answers = [await counters.add(10, charge)]
        os.kill(pid, signal.SIGSTOP)
        try:
            now[0] += RETRY_REDIS_S
            answers.append(await counters.add(10, charge))  # finds the outage
            for _ in range(2):
                now[0] += RETRY_REDIS_S
                probe = asyncio.ensure_future(counters.add(10, charge))
                await asyncio.sleep(0)  # the probe asks the frozen Redis
                assert [at_once(counters.add(10, charge)) for _ in range(3)] == [None] * 3
                answers.append(await probe)
        finally:
            os.kill(pid, signal.SIGCONT)
        now[0] += RETRY_REDIS_S
        answers.append(await counters.add(10, charge))
        await counters.close()
        return answers

    caplog.set_level(logging.WARNING, logger="ext_proc.rate_limit")
    answers = asyncio.run(scenario())
    assert answers[0] == [(0, 1)] and answers[1:4] == [None, None, None]
    # Counted again (with whatever a frozen try had sent: Redis runs it once it wakes, and that
    # request was served, so counting it is right).
    assert answers[4] is not None and answers[4][0][1] >= 2
    assert [r.getMessage() for r in caplog.records] == [
        "rate-limit store unreachable: limits fail open",
        "rate-limit store reachable again: limits counted"]


def test_ext_proc_refuses_to_start_on_unusable_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each a clear error and exit 2 before any worker starts: a password file that cannot be
    read or without --redis, a password on the command line, TLS files that do not match, a
    CRL that is not one, a password whose Redis user no certificate names."""
    files = FakeAds.client_flags()
    missing = tmp_path / "nowhere" / PASSWORD_FILE
    other = pki.ensure(tmp_path / "other", [pki.Identity(pki.Role.EXT_PROC, "x")])["x"]
    edge = pki.ensure(tmp_path / "edge", [pki.Identity(pki.Role.EDGE, "e")])["e"]
    ensure_password(tmp_path / "edge")
    password = password_file(tmp_path / "edge")
    mismatched = ["--tls-ca", files[1], "--tls-cert", files[3], "--tls-key", str(other.key)]
    cases = [
        ([*files, "--redis-password-file", str(missing)],
         "--redis-password-file and --redis-user need --redis"),
        ([*files, "--redis", "redis://127.0.0.1:1", "--redis-password-file", str(missing)],
         str(missing)),
        ([*files, "--redis", "redis://:secret-password@127.0.0.1:1"], "--redis-password-file"),
        ([*files, "--redis", "unix:///run/r.sock?password=secret-password"],
         "--redis-password-file"),
        ([*files, "--redis", "http://127.0.0.1:1"], "--redis: Redis URL must specify"),
        ([*files, "--redis", "redis://someone@127.0.0.1:1"], "--redis names a user"),
        ([*files, "--redis", "redis://127.0.0.1:1", "--redis-user", "ext-proc-1"],
         "--redis-user needs a name, and its password in --redis-password-file"),
        (mismatched, f"unusable TLS files: {other.key}: not the key of {files[3]}"),
        ([*files, "--tls-crl", str(other.cert)], f"{other.cert}: not a readable PEM CRL"),
        (["--tls-ca", str(edge.ca), "--tls-cert", str(edge.cert), "--tls-key", str(edge.key),
          "--redis", "redis://127.0.0.1:1", "--redis-password-file", str(password)],
         f"{edge.cert} names no ext_proc replica: give --redis-user"),
    ]
    for argv, says in cases:
        with pytest.raises(SystemExit) as stopped:
            ext_proc_main(argv)
        assert stopped.value.code == 2
        assert says in capsys.readouterr().err


def test_a_stack_start_removes_the_homes_of_dead_stacks_only(tmp_path: Path) -> None:
    """A stack killed with SIGKILL leaves its Redis directory (a copy of the password in its
    config); the next stack's start removes it, whether that stack runs Redis or not. A living
    stack's is kept, whether its Redis answers or not (the supervisor may be respawning it), as
    is everything else in the certs directory."""
    certs = tmp_path / "certs"
    ensure_password(certs)
    not_ours = certs / "redis-notes"  # no owner file: not made by redis_home
    not_ours.mkdir()
    (certs / "redis-link").symlink_to(not_ours)
    dead, living = (_held_by_a_child(certs) for _ in range(2))
    dead[1].kill()  # SIGKILL: the kernel drops its lock
    dead[1].wait()
    try:
        Stack(policy=default_policy_path(), log_dir=tmp_path / "logs", ports=StackPorts.free(),
              certs_dir=certs, redis="never").start_redis(timeout=5)
        assert sorted(p.name for p in certs.iterdir()) == sorted(
            [PASSWORD_FILE, not_ours.name, "redis-link", living[0].name])
        home = redis_home(certs)  # beside the living one
        remove_redis_home(home)
        assert not home.exists() and living[0].exists()
    finally:
        living[1].kill()
        living[1].wait()


def _held_by_a_child(certs: Path) -> tuple[Path, subprocess.Popen[bytes]]:
    """A Redis directory made by redis_home in another process, which keeps running."""
    script = ("import pathlib, sys, time\n"
              "from gpu_router.redis_service import redis_home\n"
              "print(redis_home(pathlib.Path(sys.argv[1])), flush=True)\n"
              "time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(certs)], stdout=subprocess.PIPE)
    assert child.stdout is not None
    return Path(child.stdout.readline().decode().strip()), child
