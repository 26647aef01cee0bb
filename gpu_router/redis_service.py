"""The Redis that holds the fleet's client rate-limit counters (ext_proc/rate_limit.py).

Only rate limits need it: in-process counters are exact for one ext_proc worker, but every
worker and replica counts alone, so a fleet (several workers, replicas or edges) needs one
shared store. `gpu-router up` and the Stack start it (no persistence: counters live two
minutes) when the policy gives some client a limit, or when asked.

It takes no command before AUTH with the fleet's password: anyone else who reached it could
reset the counters (escape a limit) or raise them (get a client refused). With the password,
only the counters' commands on the counters' keys (access_rule): whoever holds it (a revoked
replica, say) can move counters, not CONFIG SET a directory and SAVE a file as Redis's user,
FLUSHALL or load a module. The password is made
once into the certs directory (PASSWORD_FILE, mode 0600) and travels only in files: redis-server
reads it from a config file of mode 0600, ext_proc from --redis-password-file; never in argv,
which every local user can read.

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
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

from control_plane.policy.model import RoutingConfig
from ext_proc.rate_limit import COMMANDS, KEY_PREFIX
from gpu_router.processes import ManagedProcess, ProcessError

_log = logging.getLogger(__name__)

REDIS = "redis"
"""The process's name in the stack."""
MODES = ("auto", "always", "never")
PASSWORD_FILE = "redis-password"
_PASSWORD = re.compile(r"[A-Za-z0-9._~+/=-]{16,256}")
"""What a password may be: written into redis.conf and a RESP command unquoted, it must hold no
space, quote or control character."""


class RedisPasswordError(ValueError):
    """A password file that is missing, unreadable, or holds no usable password; names the file."""


def ensure_password(directory: Path) -> Path:
    """The fleet's Redis password file in `directory`, made (mode 0600) when absent; an existing
    one is kept, so every replica and restart agrees on it."""
    path = directory / PASSWORD_FILE
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
    read_password(path)
    return path


def read_password(path: Path) -> str:
    try:
        password = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise RedisPasswordError(f"{path}: cannot read the Redis password: {error}") from error
    if not _PASSWORD.fullmatch(password):
        raise RedisPasswordError(f"{path}: the Redis password must be 16 to 256 characters of "
                                 "A-Z a-z 0-9 . _ ~ + / = -")
    return password


def access_rule(password: str) -> str:
    """redis.conf's line for its one user (the default, which every client is): the password,
    and only what the rate-limit counters send (ext_proc/rate_limit.py), on their keys, and
    PING (readiness and health checks)."""
    commands = " ".join(f"+{command}" for command in (*COMMANDS, "ping"))
    return (f"user default on resetpass >{password} resetkeys ~{KEY_PREFIX}* resetchannels "
            f"-@all {commands}")


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


def redis_process(home: Path, log_dir: Path, password_file: Path) -> ManagedProcess:
    """redis-server on the socket in `home` (redis_home) behind the password in
    `password_file`, nothing persisted, no TCP port; its config (password included) is
    `home`/redis.conf, mode 0600. ProcessError when the redis-server binary (Debian: apt-get
    install redis-server) is missing."""
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
                  f"{access_rule(read_password(password_file))}\n")
    return ManagedProcess(REDIS, [binary, str(config)], log_dir / f"{REDIS}.log")


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
