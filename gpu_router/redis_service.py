"""The Redis that holds the fleet's client rate-limit counters (ext_proc/rate_limit.py).

Only rate limits need it: in-process counters are exact for one ext_proc worker, but every
worker and replica counts alone, so a fleet (several workers, replicas or edges) needs one
shared store. `gpu-router up` and the Stack start it on loopback (no persistence: counters live
two minutes) when the policy gives some client a limit, or when asked.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from control_plane.policy.model import RoutingConfig
from gpu_router.processes import ManagedProcess, ProcessError

REDIS = "redis"
"""The process's name in the stack."""
MODES = ("auto", "always", "never")


def wants_redis(mode: str, config: RoutingConfig) -> bool:
    """auto: some client has a requests or tokens per minute limit."""
    if mode not in MODES:
        raise ValueError(f"redis mode {mode!r}; one of {', '.join(MODES)}")
    if mode != "auto":
        return mode == "always"
    return any(c.limits.requests_per_minute or c.limits.tokens_per_minute for c in config.clients)


def redis_process(port: int, log_dir: Path) -> ManagedProcess:
    """redis-server on 127.0.0.1:`port`, nothing written to disk; ProcessError when the
    redis-server binary (Debian: apt-get install redis-server) is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ProcessError("client rate limits across ext_proc workers need redis-server "
                           "(Debian: apt-get install redis-server); or run gpu-router up "
                           "--redis never for per-worker counters")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--protected-mode", "yes", "--dir", str(log_dir)]
    return ManagedProcess(REDIS, argv, log_dir / f"{REDIS}.log")


def redis_answers(port: int) -> bool:
    """PING answered with PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False
