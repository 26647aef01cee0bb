"""The control plane's Redis user (control_plane/redis_users.py, gpu_router/redis_service.py): it
may only list users and delete one, and it deletes a revoked replica's user on its next look,
the replica's open connections with it, while the other replica counts on."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis_fixtures import running_redis

from control_plane.options import parse_args
from control_plane.redis_users import follow_revocations, logins, retire_revoked_users
from gpu_router.redis_service import (
    CONTROL_USER,
    DEFAULT_USER,
    USERS_DIR,
    ensure_password,
    password_file,
    read_password,
    redis_socket,
    redis_url,
    redis_user_problem,
    replica_users,
)

REPLICAS = ("ext-proc-1", "ext-proc-2")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(the certs directory, Redis's directory) of a Redis with the users of REPLICAS."""
    certs = tmp_path / "certs"
    with running_redis(certs, tmp_path, REPLICAS) as (home, _, _):
        yield certs, home


def client(home: Path, certs: Path, user: str) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(redis_socket(home)), username=user,
                       password=read_password(password_file(certs, user)), socket_timeout=5)


def authenticated(home: Path, certs: Path, user: str) -> socket.socket:
    """A raw connection to Redis, authenticated as `user` and answering."""
    connection = socket.socket(socket.AF_UNIX)
    connection.settimeout(5)
    connection.connect(str(redis_socket(home)))
    password = read_password(password_file(certs, user))
    connection.sendall(f"AUTH {user} {password}\r\nPING\r\n".encode())
    received = b""
    while received.count(b"\r\n") < 2:
        received += connection.recv(64)
    assert received == b"+OK\r\n+PONG\r\n"
    return connection


def test_the_control_plane_may_only_list_users_and_delete_one(fleet: tuple[Path, Path]) -> None:
    """Its password, if stolen, reads and moves no counter and changes no other setting."""
    certs, home = fleet
    with client(home, certs, CONTROL_USER) as control:
        assert sorted(control.acl_users()) == sorted([DEFAULT_USER, CONTROL_USER, *REPLICAS])
        refused = [
            lambda: control.get("gpu-router:rl:x:1"),
            lambda: control.incrby("gpu-router:rl:x:1", 1),
            lambda: control.config_get("dir"),
            lambda: control.acl_setuser("intruder", enabled=True, passwords=["+long-enough"]),
            lambda: control.acl_list(),
            lambda: control.flushall(),
        ]
        for command in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                command()


async def look(home: Path, certs: Path, directory: Path) -> list[str]:
    """One look of the control plane's, as it makes them, at the Redis in `home`."""
    import redis.asyncio as aredis

    password = read_password(password_file(certs, CONTROL_USER))
    control = aredis.Redis(unix_socket_path=str(redis_socket(home)), username=CONTROL_USER,
                           password=password)
    try:
        return await retire_revoked_users(control, directory,
                                          logins(redis_url(home), None, password))
    finally:
        await control.aclose()


def test_a_revoked_replicas_user_goes_with_its_open_connections(
    fleet: tuple[Path, Path]
) -> None:
    """`certs revoke` removes the replica's password file: the next look deletes its user, the
    connection it holds is closed and its password refused; the other replica counts on. A
    certs directory that cannot be listed deletes nobody."""
    certs, home = fleet
    held = authenticated(home, certs, "ext-proc-1")
    old = read_password(password_file(certs, "ext-proc-1"))
    password_file(certs, "ext-proc-1").unlink()  # as `certs revoke ext-proc-1` does

    with pytest.raises(OSError):
        asyncio.run(look(home, certs, certs / "lost-mount"))
    assert asyncio.run(look(home, certs, certs)) == ["ext-proc-1"]
    assert asyncio.run(look(home, certs, certs)) == []  # deleted once
    assert held.recv(64) == b"", "its open connection is closed"
    held.close()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(unix_socket_path=str(redis_socket(home)), username="ext-proc-1",
                    password=old, socket_timeout=5).ping()
    with client(home, certs, "ext-proc-2") as other:
        assert other.incrby("gpu-router:rl:x:1", 1) == 1


def test_a_new_password_made_before_the_look_does_not_save_the_revoked_one(
    fleet: tuple[Path, Path]
) -> None:
    """`certs revoke` then `certs init` (or a control plane away meanwhile): the file holds a
    password Redis does not know, so the user Redis has is the revoked one's."""
    certs, home = fleet
    old = read_password(password_file(certs, "ext-proc-1"))
    password_file(certs, "ext-proc-1").unlink()
    assert ensure_password(certs, "ext-proc-1") != old
    assert asyncio.run(look(home, certs, certs)) == ["ext-proc-1"]
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(unix_socket_path=str(redis_socket(home)), username="ext-proc-1",
                    password=old, socket_timeout=5).ping()


def test_the_loop_logs_an_unreachable_redis_once_then_each_removal_and_the_mend(
    fleet: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis's socket appears only after the loop started (a link made later): one warning while
    it cannot be reached, however many looks fail, then the revoked user's removal and the
    mend, each logged once."""
    certs, home = fleet
    password = read_password(password_file(certs, CONTROL_USER))
    password_file(certs, "ext-proc-2").unlink()
    link = tmp_path / "later.sock"

    def events() -> list[tuple[str, str | None]]:
        return [(r.getMessage(), getattr(r, "redis_user", None)) for r in caplog.records]

    async def until(what: str, done: Callable[[], bool]) -> None:
        for _ in range(600):  # 30 s at most
            if done():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the loop never logged {what}: {events()}")

    async def run() -> None:
        task = asyncio.create_task(
            follow_revocations(f"unix://{link}", password, None, certs, every_s=0.01))
        try:
            await until("the outage", lambda: bool(events()))
            await asyncio.sleep(0.1)  # several more looks fail meanwhile
            link.symlink_to(redis_socket(home))
            await until("the mend", lambda: len(events()) >= 3)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    caplog.set_level(logging.INFO, logger="control_plane.redis_users")
    asyncio.run(run())
    assert events() == [("redis_users_not_followed", None), ("redis_user_removed", "ext-proc-2"),
                        ("redis_users_followed_again", None)]
    assert caplog.records[0].error.startswith("ConnectionError: ")  # type: ignore[attr-defined]


def test_a_cancel_swallowed_inside_a_look_still_stops_the_loop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """redis-py's asyncio.wait_for swallows a cancel that lands as its send finishes (CPython
    3.11, gh-86296): the loop stops all the same, or the control plane's stop waits forever."""
    swallowed: list[bool] = []

    async def look_that_swallows_the_first_cancel(*_: object) -> list[str]:
        if not swallowed:
            swallowed.append(False)
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                swallowed[0] = True  # returns as wait_for does when its inner call is done
        return []

    async def run() -> None:
        task = asyncio.create_task(
            follow_revocations("unix:///nowhere.sock", "password", None, tmp_path, every_s=0.01))
        while not swallowed:
            await asyncio.sleep(0.01)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=30)
        assert swallowed == [True]
        assert done and task.cancelled(), "the loop went on after its cancel"

    monkeypatch.setattr("control_plane.redis_users.retire_revoked_users",
                        look_that_swallows_the_first_cancel)
    asyncio.run(run())


def test_redis_own_user_and_the_control_planes_are_never_a_replicas() -> None:
    in_redis = [DEFAULT_USER, CONTROL_USER, "ext-proc-2", "ext-proc-1"]
    assert replica_users(in_redis) == ["ext-proc-1", "ext-proc-2"]
    assert redis_user_problem(CONTROL_USER) is not None, "no replica may take its name"
    assert USERS_DIR not in str(password_file(Path("c"), CONTROL_USER))


def test_the_control_planes_redis_flags(capsys: pytest.CaptureFixture[str]) -> None:
    options = parse_args(["--redis", "unix:///run/r.sock", "--certs-dir", "/c"])
    assert options.redis == "unix:///run/r.sock" and options.redis_password_file is None
    for argv, says in [
        (["--redis-password-file", "p"], "--redis-password-file needs --redis"),
        (["--redis", "redis://:secret-password@h:1"], "--redis-password-file"),
        (["--redis", "redis://someone@h:1"], "the control plane is Redis's user"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            parse_args(argv)
        assert stopped.value.code == 2
        assert says in capsys.readouterr().err
