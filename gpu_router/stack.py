"""The local stack: simulated providers, control plane, ext_proc replicas and Envoy edge nodes.

`gpu-router up`, the end-to-end tests and the benchmarks all start the stack through
`Stack`, in dependency order, and stop it in reverse. A fleet on one machine is the same
stack with several Envoy nodes (each asks the control plane for its own edge port through
its node metadata) and several ext_proc replicas (each on its own port, all given to the
control plane); degraded-mode tests kill and restart its processes by name, and
`gpu-router up`'s supervisor respawns the ones that exit.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from control_plane.policy.load import load_policy_file
from gpu_router import pki
from gpu_router.admin_token import ADMIN_TOKEN_FILE, admin_token
from gpu_router.bootstrap import EdgeNode, write_bootstrap
from gpu_router.processes import (
    EnvoyAdmin,
    ManagedProcess,
    ProcessError,
    envoy_binary,
    free_port,
    port_open,
    python_module,
    stop_each,
)
from gpu_router.redis_service import (
    CONTROL_USER,
    fleet_redis,
    password_file,
    redis_url,
    remove_dead_redis_homes,
    remove_redis_home,
    wants_redis,
)
from gpu_router.stack_endpoints import ControlPlaneApi, EdgeHandle, StackPorts, admin_pin
from gpu_router.xds_status import fleet_synced

_log = logging.getLogger(__name__)

SIMULATOR = "simulator"
CONTROL_PLANE = "control-plane"
EDGE_DRAIN_S = 2
"""Envoy's --drain-time-s: how long a stopping edge keeps accepting while it discourages
keep-alive, before its listeners close."""

Probe = Callable[[], Callable[[], bool]]
"""Called just before a process (re)starts; returns the check that it is ready."""


def _never() -> bool:
    return False


def _replica_name(index: int) -> str:
    """ext_proc replica `index`'s process, certificate and Redis user."""
    return f"ext-proc-{index + 1}"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Lifecycle:
    """How the stack (re)starts and kills one of its processes."""

    what: str
    """What being ready means, for the error when it never is."""
    probe: Probe
    ports: tuple[int, ...]
    """Where it listens: it is down once none of them accepts a connection."""


@dataclass
class Stack:
    policy: Path
    log_dir: Path
    ports: StackPorts = field(default_factory=StackPorts)
    ext_proc_workers: int = 1
    """Worker processes per ext_proc replica."""
    ext_proc_replicas: int = 1
    simulators: bool = True
    """Start a simulated provider for every loopback provider in the policy."""
    edge_nodes: int = 1
    accounting: list[str] = field(default_factory=list)
    """Control-plane flags for the ledger and the audit file (--ledger, --audit-log or
    --no-accounting); empty: the control plane's defaults (the user's data directory)."""
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    """By name, in start order: simulator, control-plane, ext-proc-1.., edge-1.."""
    edges: list[EdgeHandle] = field(default_factory=list)
    ext_proc_ports: list[int] = field(default_factory=list)
    """Port of each ext_proc replica, ext-proc-1 first."""
    cancelled: Callable[[], bool] = _never
    """True once the caller shuts down: starts and restarts stop waiting (Cancelled)."""
    certs_dir: Path | None = None
    """The CA and every process's certificate for mutual TLS with the control plane, made
    there when absent (gpu_router/pki.py); None: <log_dir>/certs."""
    edge_host: str = "127.0.0.1"
    """Address every edge listens on (the control plane's --edge-host)."""
    redis: str = "auto"
    """Start redis-server for the ext_proc replicas' shared rate-limit counters: "auto" when the
    policy gives a client a limit, "always" or "never" (gpu_router/redis_service.py)."""
    edge_tls: tuple[Path, Path] | None = None
    """(certificate chain, key) every edge serves to clients over TLS (the control plane's
    --edge-tls-cert, --edge-tls-key); None: plain HTTP."""
    admin_tls: tuple[Path, Path] | None = None
    """(certificate chain, key) the control plane's admin API serves over HTTPS only (its
    --http-tls-cert, --http-tls-key); None: plain HTTP."""
    redis_url: str | None = None
    """Where the replicas' rate-limit counters are, once started; None: in each worker."""
    _lifecycles: dict[str, _Lifecycle] = field(default_factory=dict, repr=False)
    _admin_token: str = field(default="", init=False, repr=False)
    _admin_pem: bytes = field(default=b"", init=False, repr=False)
    redis_dir: Path | None = field(default=None, init=False)
    """Redis's own directory (mode 0700: its config, the password in it, and its socket), once
    started: kept while Redis may be respawned, removed at stop."""

    def start(self, timeout: float = 60.0) -> Self:
        """Start everything and wait until every edge node routes with every replica's policy."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ext_proc_ports = [self.ports.ext_proc] + [
            free_port() for _ in range(self.ext_proc_replicas - 1)
        ]
        try:
            if self.simulators:
                self.start_simulators(timeout)
            self.start_redis(timeout)  # first: the control plane follows its users
            self.start_control_plane(timeout)
            for index in range(self.ext_proc_replicas):
                self.start_ext_proc(index, timeout)
            for index in range(self.edge_nodes):
                self.start_edge(index, timeout)
            for edge in self.edges:
                edge.process.wait_until(edge.serves_models, "the edge to route", timeout)
        except BaseException:
            try:
                self.stop()
            except (OSError, subprocess.SubprocessError):  # the start's error is the one raised
                _log.exception("a process could not be stopped after the failed start")
            raise
        return self

    def start_simulators(self, timeout: float) -> None:
        sims = python_module(SIMULATOR, "simulator", ["--policy", str(self.policy)], self.log_dir)
        ports = tuple(self.simulator_ports())
        self._launch(sims, _Lifecycle(what="simulators to listen", ports=ports,
                                      probe=lambda: lambda: all(map(port_open, ports))), timeout)

    def simulator_ports(self) -> list[int]:
        from simulator.fleet import load_fleet

        return [spec.port for spec in load_fleet(self.policy).specs]

    def start_control_plane(self, timeout: float) -> None:
        args = [
            "--policy", str(self.policy),
            "--xds-port", str(self.ports.xds),
            "--http-port", str(self.ports.control_http),
            "--edge-port", str(self.ports.edge),
            "--edge-host", self.edge_host,
        ]  # fmt: skip
        for port in self.ext_proc_ports:
            args += ["--ext-proc-address", f"127.0.0.1:{port}"]
        args += self.accounting
        args += ["--edge-log-dir", str(self.log_dir)]  # each edge's durable request log
        if self.redis_url is not None:  # as Redis's user control-plane: revoked replicas' go
            args += ["--redis", self.redis_url,
                     "--redis-password-file", str(password_file(self.certs, CONTROL_USER))]
        if self.admin_tls is not None:
            args += ["--http-tls-cert", str(self.admin_tls[0]),
                     "--http-tls-key", str(self.admin_tls[1])]
        if self.edge_tls is not None:
            args += ["--edge-tls-cert", str(self.edge_tls[0]), "--edge-tls-key", str(self.edge_tls[1])]
        self.tls(pki.Role.CONTROL_PLANE, pki.Role.CONTROL_PLANE.value)
        self._admin_token = admin_token(self.certs / ADMIN_TOKEN_FILE)  # the one it will read
        self._pin_admin_certificate()
        args += ["--certs-dir", str(self.certs)]
        control = python_module(CONTROL_PLANE, "control_plane", args, self.log_dir)
        self._launch(
            control,
            _Lifecycle(
                what="its HTTP port",
                probe=lambda: lambda: self.control.healthy(),
                ports=(self.ports.xds, self.ports.control_http),
            ),
            timeout,
        )

    def start_redis(self, timeout: float) -> None:
        """redis-server for the client rate limits, when the policy or `redis` asks for it."""
        # At every start, Redis or not: a stack killed with SIGKILL left its Redis directory.
        remove_dead_redis_homes(self.certs)
        if not wants_redis(self.redis, load_policy_file(self.policy)):
            return
        home, process, answers = fleet_redis(
            self.certs, self.log_dir, map(_replica_name, range(self.ext_proc_replicas)))
        self.redis_dir = home
        self._launch(process, _Lifecycle(what="redis to take the password and answer PING",
                                         probe=lambda: answers, ports=()), timeout)
        self.redis_url = redis_url(home)

    def start_ext_proc(self, index: int, timeout: float) -> None:
        """ext_proc replica `index` (_replica_name) on its port."""
        port = self.ext_proc_ports[index]
        args = [
            "--listen", f"127.0.0.1:{port}",
            "--xds", f"127.0.0.1:{self.ports.xds}",
            "--workers", str(self.ext_proc_workers),
        ]  # fmt: skip
        name = _replica_name(index)
        if self.redis_url is not None:  # as the Redis user its certificate names
            args += ["--redis", self.redis_url,
                     "--redis-password-file", str(password_file(self.certs, name))]
        tls = self.tls(pki.Role.EXT_PROC, name)
        # No --tls-crl: the control plane sends the replica its CRL over xDS.
        args += ["--tls-ca", str(tls.ca), "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
        ext_proc = python_module(name, "ext_proc", args, self.log_dir)
        self._launch(
            ext_proc,
            _Lifecycle(
                what="its gRPC port and the routing policy in every worker",
                probe=lambda: self._new_policy_holders(port),
                ports=(port,),
            ),
            timeout,
        )

    def start_edge(self, index: int, timeout: float) -> EdgeHandle:
        """Envoy node `index`; node 0 uses the stack's edge and admin ports, others free ones
        (the edge port through node metadata, so the control plane serves it that port)."""
        node_id = f"edge-{index + 1}"
        admin_port = self.ports.admin if index == 0 else free_port()
        edge_port = self.ports.edge if index == 0 else free_port()
        bootstrap = write_bootstrap(
            EdgeNode(
                node_id=node_id,
                admin_port=admin_port,
                xds_port=self.ports.xds,
                edge_port=None if index == 0 else edge_port,
                tls=self.tls(pki.Role.EDGE, node_id),
                secrets_dir=self.log_dir / f"{node_id}.secrets",
            ),
            self.log_dir / f"{node_id}.bootstrap.yaml",
        )
        argv = [
            envoy_binary(), "-c", str(bootstrap), "--disable-hot-restart",
            "--log-level", "warning", "--drain-time-s", str(EDGE_DRAIN_S),
            "--parent-shutdown-time-s", str(EDGE_DRAIN_S + 1),
            "--file-flush-interval-msec", "500",  # the decision log on stdout, near real time
        ]  # fmt: skip
        process = ManagedProcess(node_id, argv, self.log_dir / f"{node_id}.log")
        handle = EdgeHandle(node_id, edge_port, EnvoyAdmin(admin_port), process,
                            "http" if self.edge_tls is None else "https")
        self._launch(
            process,
            _Lifecycle(
                what="Envoy to accept its config from the control plane",
                probe=lambda: handle.admin.ready,
                ports=(edge_port, admin_port),
            ),
            timeout,
        )
        self.edges.append(handle)
        return handle

    @property
    def certs(self) -> Path:
        return self.certs_dir if self.certs_dir is not None else self.log_dir / "certs"

    def tls(self, role: pki.Role, name: str) -> pki.TlsFiles:
        """The CA and `name`'s certificate and key, made now if absent (raises pki.PkiError)."""
        return pki.ensure(self.certs, [pki.Identity(role, name)])[name]

    def _launch(self, process: ManagedProcess, lifecycle: _Lifecycle, timeout: float) -> None:
        self.processes[process.name] = process
        self._lifecycles[process.name] = lifecycle
        ready = lifecycle.probe()
        process.start().wait_until(ready, lifecycle.what, timeout, self.cancelled)

    def kill(self, name: str, timeout: float = 10.0) -> None:
        """SIGKILL one process and its workers, as a crash would; return once none of its
        ports accepts a connection (its workers die a moment after it)."""
        self.processes[name].kill()
        deadline = time.monotonic() + timeout
        while any(map(port_open, self._lifecycles[name].ports)):
            if time.monotonic() > deadline:
                raise ProcessError(f"{name}: still listening {timeout:.0f}s after SIGKILL")
            time.sleep(0.05)

    def restart(self, name: str, timeout: float = 60.0) -> None:
        """Respawn `name` and wait until it is ready again."""
        what = self._lifecycles[name].what
        if name == CONTROL_PLANE:
            what += " and every node to resync"
        self.processes[name].wait_until(self.respawn(name), what, timeout, self.cancelled)

    def respawn(self, name: str) -> Callable[[], bool]:
        """Stop `name` and what is left of its process group, start the same argv again (same
        ports); return the check that it is ready, without waiting for it.

        Ready means what it meant at start; for the control plane also that every edge node
        and every ext_proc worker is back in sync with it (they reconnect with backoff).
        """
        process, lifecycle = self.processes[name], self._lifecycles[name]
        process.stop()
        ready = lifecycle.probe()
        if name != CONTROL_PLANE:
            process.start()
            return ready
        self._pin_admin_certificate()  # the certificate it reads as it starts again
        process.start()
        return lambda: ready() and self.fleet_synced()

    def _pin_admin_certificate(self) -> None:
        """The admin certificate the control plane reads as it (re)starts."""
        self._admin_pem = b"" if self.admin_tls is None else self.admin_tls[0].read_bytes()

    @property
    def control(self) -> ControlPlaneApi:
        """The control plane's admin API, with its admin token (and its pinned certificates)."""
        return ControlPlaneApi(port=self.ports.control_http, token=self._admin_token, pinned=(
            None if self.admin_tls is None else admin_pin(self._admin_pem, self.admin_tls[0])))

    def control_url(self, path: str) -> str:
        return self.control.url(path)

    def control_get(self, path: str) -> tuple[int, bytes]:
        return self.control.get(path)

    def fleet_synced(self) -> bool:
        """Whether every edge node runs the control plane's listener and clusters, and every
        ext_proc worker its routing policy."""
        workers = self.ext_proc_replicas * self.ext_proc_workers
        return fleet_synced(self.control.xds_nodes(), (e.node_id for e in self.edges), workers)

    def _new_policy_holders(self, port: int) -> Callable[[], bool]:
        """Ready check of an ext_proc replica about to (re)start on `port`: it listens, and as
        many ext_proc nodes as it has workers, none connected before, hold the current policy."""
        holders = self.control.new_policy_holders(self.ext_proc_workers)
        return lambda: port_open(port) and holders()

    @property
    def url(self) -> str:
        return self.edges[0].url

    def stop(self) -> None:
        """Stop everything at once, in reverse start order (tests, a failed start); the first
        error stopping one is raised once every other was stopped too."""
        try:
            _, errors = stop_each(self.processes, reversed(list(self.processes)))
        finally:
            self._remove_redis_dir()
        if errors:
            raise errors[0]

    def shutdown(self, drain_s: float = EDGE_DRAIN_S) -> tuple[dict[str, int | None],
                                                               list[Exception]]:
        """Stop for good, the edges last and drained: every edge starts its graceful drain,
        ext_proc and the control plane stop meanwhile (Envoy fails open without ext_proc and
        keeps its last config without the control plane), the edges stop once `drain_s` has
        passed, and the simulated providers after them, as the last requests still need them.
        Returns each process's exit status, in the order they were stopped, and the errors of
        those that could not be stopped, for the caller to report both before it raises.
        """
        try:
            return self._shut_down(drain_s)
        finally:
            self._remove_redis_dir()

    def _shut_down(self, drain_s: float) -> tuple[dict[str, int | None], list[Exception]]:
        draining_since = time.monotonic()
        edges = [edge.node_id for edge in self.edges]
        for edge in self.edges:
            if edge.process.alive():
                with contextlib.suppress(OSError, ProcessError):  # it stops by SIGTERM anyway
                    edge.admin.drain_listeners()
        routers = [name for name in reversed(self.processes) if name not in edges + [SIMULATOR]]
        exits, errors = stop_each(self.processes, routers)
        time.sleep(max(0.0, draining_since + drain_s - time.monotonic()))
        last = [*reversed(edges), *([SIMULATOR] if SIMULATOR in self.processes else [])]
        more_exits, more_errors = stop_each(self.processes, last)
        return exits | more_exits, errors + more_errors

    def _remove_redis_dir(self) -> None:
        if self.redis_dir is not None:
            remove_redis_home(self.redis_dir)

    def __enter__(self) -> Self:
        """Starts the stack, unless `with Stack(...).start()` already did (starting twice would
        leave the first set of processes running)."""
        return self if self.processes else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
