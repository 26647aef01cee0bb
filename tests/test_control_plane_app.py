"""`python -m control_plane` end to end: real Envoy, an ext_proc-like xDS client, policy edits."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from polling import eventually
from xds_fixtures import dynamic_clusters, policy_file, running_envoy

from control_plane.xds import type_urls
from gpu_router import pki
from gpu_router.admin_token import ADMIN_TOKEN_FILE, bearer, read_admin_token
from gpu_router.api.v1 import health_pb2, routing_pb2
from gpu_router.grpc_tls import channel_credentials
from gpu_router.processes import (
    EnvoyAdmin,
    ManagedProcess,
    free_port,
    http_get,
    port_open,
    python_module,
)

EXT_PROC = "gpu-router.ext_proc"


@dataclass
class ControlPlane:
    process: ManagedProcess
    xds_port: int
    http_port: int
    certs: Path

    def tls(self, role: pki.Role, name: str) -> pki.TlsFiles:
        """A client certificate from the control plane's own CA (it made it on start)."""
        return pki.ensure(self.certs, [pki.Identity(role, name)])[name]

    def events(self, name: str) -> list[dict]:
        lines = self.process.log_path.read_text().splitlines()
        return [entry for entry in map(json.loads, filter(None, lines)) if entry["event"] == name]

    def get(self, path: str) -> Any:
        token = read_admin_token(self.certs / ADMIN_TOKEN_FILE)  # it made it on start
        status, body = http_get(f"http://127.0.0.1:{self.http_port}{path}", headers=bearer(token))
        assert status == 200, body
        return json.loads(body)


def control_plane_args(policy: Path, xds_port: int, http_port: int, certs: Path) -> list[str]:
    return [
        "--certs-dir",
        str(certs),
        "--policy",
        str(policy),
        "--xds-port",
        str(xds_port),
        "--http-port",
        str(http_port),
        "--edge-port",
        str(free_port()),
        "--ext-proc-address",
        f"127.0.0.1:{free_port()}",
    ]


@pytest.fixture
def start_control_plane(tmp_path: Path) -> Iterator[Callable[[Path], ControlPlane]]:
    started: list[ManagedProcess] = []

    def start(policy: Path) -> ControlPlane:
        xds_port, http_port = free_port(), free_port()
        process = python_module(
            "control-plane",
            "control_plane",
            control_plane_args(policy, xds_port, http_port, tmp_path / "certs"),
            tmp_path,
        ).start()
        started.append(process)
        process.wait_until(
            lambda: port_open(xds_port) and port_open(http_port), "xDS and HTTP ports"
        )
        return ControlPlane(process, xds_port, http_port, tmp_path / "certs")

    try:
        yield start
    finally:
        for process in started:
            process.stop()


class FakeExtProc:
    """Subscribes like an ext_proc replica; on each RoutingPolicy, notes what Envoy has then."""

    def __init__(self, xds_port: int, envoy: EnvoyAdmin, tls: pki.TlsFiles) -> None:
        self.envoy = envoy
        self.policies: list[tuple[str, set[str], set[str]]] = []
        """(policy version, its provider clusters, Envoy's active clusters on arrival), in order."""
        self.health: list[health_pb2.HealthSnapshot] = []
        self._requests: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
        self._channel = grpc.secure_channel(f"127.0.0.1:{xds_port}", channel_credentials(tls))
        node = base_pb2.Node(id="ext-proc-test-1", cluster="gpu-router-ext-proc")
        for type_url in (type_urls.ROUTING_POLICY, type_urls.HEALTH_SNAPSHOT):
            self._requests.put(discovery_pb2.DiscoveryRequest(type_url=type_url, node=node))
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        self._call = stub.StreamAggregatedResources(iter(self._requests.get, None))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                if response.type_url == type_urls.ROUTING_POLICY:
                    policy = routing_pb2.RoutingPolicy()
                    response.resources[0].Unpack(policy)
                    self.policies.append(
                        (
                            policy.version,
                            {p.cluster for p in policy.providers},
                            set(dynamic_clusters(self.envoy)),
                        )
                    )
                else:
                    snapshot = health_pb2.HealthSnapshot()
                    response.resources[0].Unpack(snapshot)
                    self.health.append(snapshot)
                self._requests.put(
                    discovery_pb2.DiscoveryRequest(
                        type_url=response.type_url,
                        version_info=response.version_info,
                        response_nonce=response.nonce,
                    )
                )
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._channel.close()
        self._thread.join(timeout=5)


def test_bad_policy_at_startup_exits_2_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers:\n  - name: Not_Valid\n")
    result = subprocess.run(
        [sys.executable, "-m", "control_plane",
         *control_plane_args(bad, free_port(), free_port(), tmp_path / "certs")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"policy {bad} rejected" in result.stderr and "Traceback" not in result.stderr


def test_an_unreadable_crl_stops_the_start_with_the_file_named(tmp_path: Path) -> None:
    """Revoked edges must stay refused: the control plane does not start without its CRL."""
    certs = tmp_path / "certs"
    other = pki.ensure(tmp_path / "other", [pki.Identity(pki.Role.EDGE, "e")])["e"]
    pki.ensure(certs, [])
    (certs / "crl.pem").write_bytes(other.cert.read_bytes())  # a certificate, not a CRL
    result = subprocess.run(
        [sys.executable, "-m", "control_plane",
         *control_plane_args(policy_file(tmp_path / "policy.yaml"), free_port(), free_port(),
                             certs)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert f"{certs / 'crl.pem'}: not a readable PEM CRL" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_stops_gracefully(
    start_control_plane: Callable[[Path], ControlPlane], tmp_path: Path
) -> None:
    control_plane = start_control_plane(policy_file(tmp_path / "policy.yaml"))
    control_plane.process.stop()
    assert control_plane.process.popen is not None and control_plane.process.popen.returncode == 0
    assert control_plane.events("control_plane_stopped")


def test_policy_edits_roll_out_make_before_break_and_bad_edits_are_rejected(
    start_control_plane: Callable[[Path], ControlPlane], tmp_path: Path
) -> None:
    policy = policy_file(tmp_path / "policy.yaml", without=("runpod",))
    control_plane = start_control_plane(policy)
    edge_tls = control_plane.tls(pki.Role.EDGE, "edge-1")
    with running_envoy(tmp_path, "edge-1", control_plane.xds_port, edge_tls) as (_, envoy):
        first = {"lambda", "coreweave", "vast"}
        eventually(
            lambda: set(dynamic_clusters(envoy)) == first | {EXT_PROC},
            "the first policy's clusters",
        )
        ext_proc = FakeExtProc(
            control_plane.xds_port, envoy, control_plane.tls(pki.Role.EXT_PROC, "ext-proc-test")
        )
        try:
            eventually(
                lambda: bool(ext_proc.policies) and bool(ext_proc.health),
                "ext_proc's policy and health",
            )
            assert ext_proc.policies[0][1] == first

            policy_file(policy, without=("vast",))
            second = {"lambda", "coreweave", "runpod"}
            eventually(
                lambda: set(dynamic_clusters(envoy)) == second | {EXT_PROC}, "runpod in, vast out"
            )
            eventually(lambda: ext_proc.policies[-1][1] == second, "ext_proc to get the new policy")
            version, _, envoy_had = ext_proc.policies[-1]
            assert "runpod" in envoy_had, "ext_proc learned of runpod before Envoy had its cluster"
            assert "vast" in envoy_had, "vast left Envoy before it left ext_proc's view"

            applied = len(control_plane.events("policy_applied"))
            policy.write_text("providers: [oops\n")
            eventually(
                lambda: bool(control_plane.events("policy_rejected")), "policy_rejected in the log"
            )
            [rejected] = control_plane.events("policy_rejected")
            assert rejected["file"] == str(policy) and rejected["error"]
            assert set(dynamic_clusters(envoy)) == second | {EXT_PROC}
            assert len(control_plane.events("policy_applied")) == applied

            nodes = control_plane.get("/v1/xds")
            edge = next(n for n in nodes if n["id"] == "edge-1")
            assert all(t["nacked_version"] == "" for t in edge["types"].values())
            assert control_plane.get("/v1/policy")["version"] == version
            assert all(providers <= active for _, providers, active in ext_proc.policies)
        finally:
            ext_proc.close()
    assert not control_plane.events("xds_nack")
