"""The local stack: simulated providers, control plane, ext_proc and Envoy edge nodes.

`gpu-router up`, the end-to-end tests and the benchmarks all start the stack through
`Stack`, in dependency order, and stop it in reverse.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpu_router.bootstrap import EdgeNode, write_bootstrap
from gpu_router.processes import (
    EnvoyAdmin,
    ManagedProcess,
    ProcessError,
    envoy_binary,
    free_port,
    http_get,
    port_open,
    python_module,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class StackPorts:
    edge: int = 10000
    admin: int = 9901
    xds: int = 18000
    ext_proc: int = 50051
    control_http: int = 8080

    @classmethod
    def free(cls) -> StackPorts:
        return cls(edge=free_port(), admin=free_port(), xds=free_port(), ext_proc=free_port(),
                   control_http=free_port())


@dataclass(frozen=True, slots=True)
class EdgeHandle:
    """One running Envoy edge node."""

    node_id: str
    edge_port: int
    admin: EnvoyAdmin
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.edge_port}"


@dataclass
class Stack:
    policy: Path
    log_dir: Path
    ports: StackPorts = field(default_factory=StackPorts)
    ext_proc_workers: int = 1
    simulators: bool = True
    """Start a simulated provider for every loopback provider in the policy."""
    edge_nodes: int = 1
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    edges: list[EdgeHandle] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> Stack:
        """Start everything and wait until a request through every edge reaches ext_proc's policy."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.simulators:
                self.start_simulators(timeout)
            self.start_control_plane(timeout)
            self.start_ext_proc(timeout)
            for index in range(self.edge_nodes):
                self.start_edge(index, timeout)
            for edge in self.edges:
                edge.process.wait_until(lambda e=edge: self.edge_serves_models(e), "the edge to route", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def start_simulators(self, timeout: float) -> None:
        sims = python_module("simulator", "simulator", ["--policy", str(self.policy)], self.log_dir).start()
        self.processes["simulator"] = sims
        sims.wait_until(lambda: all(port_open(p) for p in self.simulator_ports()), "simulators to listen", timeout)

    def simulator_ports(self) -> list[int]:
        from simulator.fleet import load_fleet

        return [spec.port for spec in load_fleet(self.policy).specs]

    def start_control_plane(self, timeout: float) -> None:
        args = ["--policy", str(self.policy), "--xds-port", str(self.ports.xds),
                "--http-port", str(self.ports.control_http), "--edge-port", str(self.ports.edge),
                "--ext-proc-address", f"127.0.0.1:{self.ports.ext_proc}"]
        control = python_module("control-plane", "control_plane", args, self.log_dir).start()
        self.processes["control-plane"] = control
        control.wait_until(lambda: http_get(self.control_url("/healthz"))[0] == 200, "its HTTP port", timeout)

    def start_ext_proc(self, timeout: float) -> None:
        args = ["--listen", f"127.0.0.1:{self.ports.ext_proc}", "--xds", f"127.0.0.1:{self.ports.xds}",
                "--workers", str(self.ext_proc_workers)]
        ext_proc = python_module("ext-proc", "ext_proc", args, self.log_dir).start()
        self.processes["ext-proc"] = ext_proc
        ext_proc.wait_until(lambda: port_open(self.ports.ext_proc), "its gRPC port", timeout)

    def start_edge(self, index: int, timeout: float) -> EdgeHandle:
        """Envoy node `index`; node 0 uses the stack's admin port, others get free ones."""
        node_id = f"edge-{index + 1}"
        admin_port = self.ports.admin if index == 0 else free_port()
        edge_port = self.ports.edge
        bootstrap = write_bootstrap(
            EdgeNode(node_id=node_id, admin_port=admin_port, xds_port=self.ports.xds),
            self.log_dir / f"{node_id}.bootstrap.yaml",
        )
        argv = [envoy_binary(), "-c", str(bootstrap), "--base-id", str(free_port()),
                "--log-level", "warning", "--drain-time-s", "2", "--parent-shutdown-time-s", "3"]
        process = ManagedProcess(node_id, argv, self.log_dir / f"{node_id}.log").start()
        self.processes[node_id] = process
        handle = EdgeHandle(node_id, edge_port, EnvoyAdmin(admin_port), process)
        process.wait_until(handle.admin.ready, "Envoy to accept its config from the control plane", timeout)
        self.edges.append(handle)
        return handle

    def edge_serves_models(self, edge: EdgeHandle) -> bool:
        status, body = http_get(f"{edge.url}/v1/models")
        return status == 200 and bool(json.loads(body).get("data"))

    def control_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.ports.control_http}{path}"

    @property
    def url(self) -> str:
        return self.edges[0].url

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            self.processes[name].stop()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_forever(self) -> None:
        """Block until a child dies (then raise) or the caller is interrupted."""
        while True:
            for name, process in self.processes.items():
                if not process.alive():
                    raise ProcessError(f"{name} exited:\n{process.log_tail()}")
            time.sleep(0.5)
