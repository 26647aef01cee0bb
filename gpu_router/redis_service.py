"""The Redis that holds the fleet's client rate-limit counters (ext_proc/rate_limit.py).

Only rate limits need it: in-process counters are exact for one ext_proc worker, but every
worker and replica counts alone, so a fleet (several workers, replicas or edges) needs one
shared store. `gpu-router up` and the Stack start it (no persistence: counters live two
minutes) when the policy gives some client a limit, or when asked.

It takes no command before AUTH: anyone else who reached it could reset the counters (escape a
limit) or raise them (get a client refused). Each ext_proc replica is a Redis user of its own,
named as its certificate, with its own password, which runs only the counters' commands on the
counters' keys (access_rules): a stolen password moves counters, but cannot CONFIG SET a
directory and SAVE a file as Redis's user, FLUSHALL or load a module, and a revoked replica's
goes with its certificate: `certs revoke` removes its password file, and the control plane,
Redis's user CONTROL_USER, which may only list users and delete one, deletes within a second
(control_plane/redis_users.py) a replica's user that the password in its file no longer opens,
its open connections with it. The default user
may only PING. The passwords are made once into the certs directory (PASSWORD_FILE,
CONTROL_PASSWORD_FILE, USERS_DIR, mode 0600) and travel only in files:
redis-server reads them from a config file of mode 0600, ext_proc from --redis-password-file;
never in argv, which every local user can read.

The stack's Redis listens on a unix socket in a directory of its own (mode 0700, redis_home),
and on no TCP port. A port picked free can be taken by any local user between the pick and Redis's bind, and
whoever holds it would be sent the password (by the stack's readiness probe, then by every
ext_proc worker). A socket in a directory only this user may enter can only be this user's.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from control_plane.policy.model import RoutingConfig
from ext_proc.rate_limit import COMMANDS, KEY_PREFIX
from gpu_router.processes import ManagedProcess, ProcessError
from gpu_router.secret_files import SecretFileError, ensure_secret, read_secret

_log = logging.getLogger(__name__)

REDIS = "redis"
"""The process's name in the stack."""
MODES = ("auto", "always", "never")
PASSWORD_FILE = "redis-password"
"""The password of Redis's default user, which may only PING (readiness and health checks)."""
USERS_DIR = "redis-users"
"""One password file per ext_proc replica, named as the replica: its Redis user."""
CONTROL_PASSWORD_FILE = "redis-control-password"
"""The password of the control plane's Redis user (CONTROL_USER)."""
DEFAULT_USER = "default"
CONTROL_USER = "control-plane"
"""The control plane's Redis user, named as its certificate: CONTROL_COMMANDS only."""
CONTROL_COMMANDS = ("acl|users", "acl|deluser")
_WHAT = "the Redis password"
_USER = re.compile(r"[A-Za-z0-9._-]{1,64}")


RedisPasswordError = SecretFileError
"""A password file that is missing, unreadable, or holds no usable password; names the file."""


def redis_user_problem(name: str) -> str | None:
    """Why an ext_proc replica's name cannot be its Redis user's (written into redis.conf
    unquoted); None when it can."""
    if name in (DEFAULT_USER, CONTROL_USER) or not _USER.fullmatch(name):
        return (f"{name!r} cannot name a Redis user: 1 to 64 of A-Z a-z 0-9 . _ -, and not "
                f"{DEFAULT_USER!r} (Redis's own) or {CONTROL_USER!r} (the control plane's)")
    return None


def password_file(directory: Path, user: str | None = None) -> Path:
    """Where `directory` keeps the password of the default user (None), the control plane's
    (CONTROL_USER) or replica `user`'s."""
    if user is None:
        return directory / PASSWORD_FILE
    if user == CONTROL_USER:
        return directory / CONTROL_PASSWORD_FILE
    return directory / USERS_DIR / user


def ensure_password(directory: Path, user: str | None = None) -> str:
    """The password of Redis's default user (None), the control plane's (CONTROL_USER) or
    ext_proc replica `user`'s, in its file in `directory` (password_file), made (mode 0600)
    when absent; an existing one is kept, so every restart agrees on it."""
    problem = None if user in (None, CONTROL_USER) else redis_user_problem(user)
    if problem is not None:
        raise RedisPasswordError(problem)
    return ensure_secret(password_file(directory, user), _WHAT)


def read_password(path: Path) -> str:
    return read_secret(path, _WHAT)


def access_rules(directory: Path, replicas: Iterable[str]) -> str:
    """redis.conf's users, with the passwords in `directory` (made when absent): the default
    user, which every client is before AUTH, may only PING; the control plane may only list
    users and delete one (CONTROL_COMMANDS), on no key; each ext_proc replica is a user of its
    own, whose password runs only the counters' commands (ext_proc/rate_limit.py) on their
    keys. A replica's password goes with its certificate (`certs revoke`): the control plane
    deletes its user from a running Redis, and rules rendered after the revocation lack it."""
    default = ensure_password(directory)
    control = ensure_password(directory, CONTROL_USER)
    control_commands = " ".join(f"+{command}" for command in ("ping", *CONTROL_COMMANDS))
    rules = [f"user {DEFAULT_USER} on resetpass >{default} resetkeys resetchannels -@all +ping",
             f"user {CONTROL_USER} on resetpass >{control} resetkeys resetchannels -@all "
             + control_commands]
    commands = " ".join(f"+{command}" for command in (*COMMANDS, "ping"))
    for name in sorted(set(replicas)):
        password = ensure_password(directory, name)
        rules.append(f"user {name} on resetpass >{password} resetkeys ~{KEY_PREFIX}* "
                     f"resetchannels -@all {commands}")
    return "\n".join(rules) + "\n"


def replica_passwords(directory: Path) -> dict[str, str]:
    """Replica -> the password `directory` keeps for its Redis user (USERS_DIR); a file that
    cannot be read counts as none. OSError when the directory cannot be listed."""
    passwords = {}
    for path in (directory / USERS_DIR).iterdir():
        try:
            passwords[path.name] = read_password(path)
        except SecretFileError:
            continue
    return passwords


def replica_users(in_redis: Iterable[str]) -> list[str]:
    """Redis's users that are replicas': all but Redis's own and the control plane's."""
    return sorted(set(in_redis) - {DEFAULT_USER, CONTROL_USER})


def wants_redis(mode: str, config: RoutingConfig) -> bool:
    """auto: some client has a requests or tokens per minute limit."""
    if mode not in MODES:
        raise ValueError(f"redis mode {mode!r}; one of {', '.join(MODES)}")
    if mode != "auto":
        return mode == "always"
    return any(c.limits.requests_per_minute or c.limits.tokens_per_minute for c in config.clients)


_MAX_SOCKET_PATH = 100
"""A unix socket's path must fit sockaddr_un (108 bytes on Linux, with its NUL)."""


_OWNER_FILE = ".gpu-router-redis-owner"
"""Written into a Redis directory once its stack holds the directory's lock: a directory without
it is still being made, and is left alone."""
_held: dict[Path, int] = {}
"""This process's Redis directories -> the descriptor holding each one's lock."""


def redis_home(certs: Path) -> Path:
    """A new directory (mode 0700) for one Redis: its config and its socket; the stack removes
    it. In the certs directory (private, and not cleaned by age as /tmp is on many systems,
    which would take the socket from under a long-running service), or in the system's
    temporary directory when a socket's path there would be too long.

    The calling process holds an flock on the directory until remove_redis_home: the kernel
    drops it when the process dies, SIGKILL included. So a stack killed before it could remove
    its directory leaves one whose lock is free (remove_dead_redis_homes), and a living stack's,
    its Redis running, starting or being respawned, is never taken for it."""
    for parent, prefix in _places(certs):
        home = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        if len(bytes(redis_socket(home))) <= _MAX_SOCKET_PATH:
            descriptor = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            _held[home] = descriptor
            (home / _OWNER_FILE).write_text(f"{os.getpid()}\n")
            return home
        home.rmdir()
    raise ProcessError(f"{redis_socket(home)}: too long for a unix socket's path; set TMPDIR "
                       "to a shorter directory")


def remove_redis_home(home: Path) -> None:
    """A Redis directory, its config (a copy of the password) and socket with it; the password
    itself stays in redis-password, which the next stack reads. A directory that cannot be
    removed is logged: a copy of the password stays there."""
    try:
        shutil.rmtree(home)
    except FileNotFoundError:
        pass
    except OSError as error:
        _log.warning("redis directory not removed", extra={"path": str(home), "error": str(error)})
    finally:
        descriptor = _held.pop(home, None)
        if descriptor is not None:
            os.close(descriptor)


def _places(certs: Path) -> tuple[tuple[Path, str], ...]:
    """Where redis_home makes a directory, in order, and the prefix of its name there."""
    return (certs, "redis-"), (Path(tempfile.gettempdir()), "gpu-router-redis-")


def remove_dead_redis_homes(certs: Path) -> None:
    """Remove the Redis directories that dead stacks left where redis_home(certs) makes them
    (one killed with SIGKILL leaves its directory, a copy of the password in it): this user's
    directories made by redis_home (the owner file in them) whose lock nobody holds."""
    uid = os.getuid()
    for parent, prefix in _places(certs):
        for home in parent.glob(f"{prefix}*"):
            try:
                info = home.lstat()
                if (not stat.S_ISDIR(info.st_mode) or info.st_uid != uid
                        or not (home / _OWNER_FILE).is_file()):
                    continue
                descriptor = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue  # gone meanwhile, or not ours to read
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its stack lives
            finally:
                os.close(descriptor)
            _log.info("removing a dead stack's redis directory", extra={"path": str(home)})
            remove_redis_home(home)


def redis_socket(home: Path) -> Path:
    return home / "redis.sock"


def redis_url(home: Path) -> str:
    """What ext_proc's --redis takes for the Redis in `home`."""
    return f"unix://{redis_socket(home)}"


def redis_process(home: Path, log_dir: Path, rules: str) -> ManagedProcess:
    """redis-server on the socket in `home` (redis_home) with these users (access_rules),
    nothing persisted, no TCP port; its config (passwords included) is `home`/redis.conf, mode
    0600. ProcessError when the redis-server binary (Debian: apt-get install redis-server) is
    missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ProcessError("client rate limits across ext_proc workers need redis-server "
                           "(Debian: apt-get install redis-server); or run gpu-router up "
                           "--redis never for per-worker counters")
    config = home / "redis.conf"
    descriptor = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(descriptor, "w") as out:
        out.write(f"port 0\nunixsocket {_quoted(str(redis_socket(home)))}\nunixsocketperm 700\n"
                  f"protected-mode yes\nsave \"\"\nappendonly no\ndir {_quoted(str(home))}\n"
                  f"{rules}")
    return ManagedProcess(REDIS, [binary, str(config)], log_dir / f"{REDIS}.log")


def fleet_redis(certs: Path, log_dir: Path, replicas: Iterable[str]
                ) -> tuple[Path, ManagedProcess, Callable[[], bool]]:
    """A redis-server for these ext_proc replicas (their users: access_rules, with the passwords
    in `certs`) in a new redis_home: (that directory, the process, the check that it answers
    PING after AUTH as the default user)."""
    password = ensure_password(certs)
    home = redis_home(certs)
    try:
        process = redis_process(home, log_dir, access_rules(certs, replicas))
    except BaseException:
        remove_redis_home(home)
        raise
    return home, process, partial(redis_answers, redis_socket(home), password)


def _quoted(text: str) -> str:
    """A redis.conf string argument."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def redis_answers(socket: Path, password: str) -> bool:
    """AUTH accepted and PING answered on `socket` (redis-py, as ext_proc's counters speak to
    it; imported here, as there, so that a stack without Redis never loads it)."""
    import redis

    try:
        with redis.Redis(unix_socket_path=str(socket), password=password, socket_timeout=0.5,
                         socket_connect_timeout=0.5) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
