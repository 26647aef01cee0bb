"""Renewing the fleet's certificates while a stack runs: every process takes its new pair
without a restart, from the next connection on. The edge Envoy reads its own certificate and
the fleet's CA from SDS files it watches (gpu_router/bootstrap.py; the control plane points the
node's ext_proc cluster at them), the control plane's and ext_proc's gRPC ports hand each new
connection the pair their files hold (gpu_router/grpc_tls.py). 64 clients send throughout and
none fails."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from cryptography import x509
from edge_tls_fixtures import der, reissue, served_certificate
from polling import eventually
from stack_harness import BATCH, CLI, CLIENTS, MODEL, Traffic, default_stack, reason, refusals

from control_plane.translate.edge_secret_files import CONNECTION_MAX_AGE_S
from control_plane.translate.fallback_routes import FALLBACK_REASON
from gpu_router import pki
from gpu_router.pem_files import load_cert
from gpu_router.processes import http_get
from gpu_router.stack import Stack

EDGE = pki.Identity(pki.Role.EDGE, "edge-1")
CONTROL_PLANE = pki.Identity(pki.Role.CONTROL_PLANE, pki.Role.CONTROL_PLANE.value)
REPLICA = pki.Identity(pki.Role.EXT_PROC, "ext-proc-1")


def reissue_in(stack: Stack, identity: pki.Identity) -> x509.Certificate:
    """A new pair for `identity` in the stack's certs directory, with the SANs `gpu-router up`
    gives it."""
    extra = ({"dns": pki.SERVER_DNS, "ips": pki.SERVER_IPS}
             if identity.role is pki.Role.CONTROL_PLANE else {})
    return reissue(pki.tls_files(stack.certs, identity.name), identity, **extra)


def edge_serials(stack: Stack) -> list[int]:
    """The serial of the certificate in each of the edge's client TLS contexts (the xDS
    cluster's and the ext_proc cluster's), as its admin's /certs shows them (in hex, with a
    leading zero where the serial's encoding has one)."""
    status, body = http_get(stack.edges[0].admin.url("/certs"))
    assert status == 200
    return [int(chain["serial_number"], 16) for context in json.loads(body)["certificates"]
            for chain in context["cert_chain"]]


def test_the_fleet_takes_renewed_certificates_without_a_restart(stack: Stack) -> None:
    pids = {name: process.pid for name, process in stack.processes.items()}
    before = edge_serials(stack)
    assert before == [load_cert(stack.certs / "edge-1.pem").serial_number] * 2
    with Traffic(stack, MODEL, BATCH, threads=CLIENTS) as traffic:
        edge = reissue_in(stack, EDGE)
        for identity in (CONTROL_PLANE, REPLICA):
            reissue_in(stack, identity)
        eventually(lambda: edge_serials(stack) == [edge.serial_number] * 2,
                   "the edge to take its renewed certificate in both contexts")
        client = pki.tls_files(stack.certs, EDGE.name)
        for port, identity in ((stack.ports.xds, CONTROL_PLANE),
                               (stack.ports.ext_proc, REPLICA)):
            renewed = der(pki.tls_files(stack.certs, identity.name).cert)
            eventually(lambda port=port, renewed=renewed:
                       served_certificate(port, client) == renewed,
                       f"port {port} to serve its renewed certificate")
        after = time.monotonic()
        eventually(lambda: len(traffic.sent_after(after)) >= CLIENTS, "the clients to go on")
    assert traffic.total() and traffic.failures() == {}, traffic.failed
    assert {name: process.pid for name, process in stack.processes.items()} == pids
    assert reason(stack) != FALLBACK_REASON


def test_an_edge_whose_replaced_certificate_is_revoked_reconnects_with_its_new_one(
        tmp_path: Path) -> None:
    """Revoked after the edge took its renewal (a key thought stolen): the control plane and the
    replica refuse every stream on the connections the edge made with the old certificate, and
    Envoy does not close those when it reloads one. They take no new stream after
    CONNECTION_MAX_AGE_S, so the edge opens new ones with its new certificate: it syncs again
    and ext_proc decides again, and no client request fails meanwhile (the fallback routes).
    A stack of its own: every connection of its edge made with the certificate revoked."""
    with default_stack(tmp_path) as stack:
        _revoke_the_replaced_certificate(stack)


def _revoke_the_replaced_certificate(stack: Stack) -> None:
    old = pki.tls_files(stack.certs, EDGE.name)
    retired = pki.tls_files(stack.certs, "retired-edge-1")  # its name for `certs revoke`
    for source, target in ((old.cert, retired.cert), (old.key, retired.key)):
        shutil.copy(source, target)
    edge = reissue_in(stack, EDGE)
    eventually(lambda: edge_serials(stack) == [edge.serial_number] * 2, "the renewal taken")
    refused = len(refusals(stack))
    with Traffic(stack, MODEL, BATCH, threads=CLIENTS) as traffic:
        result = subprocess.run([*CLI, "certs", "revoke", "--dir", str(stack.certs),
                                 "retired-edge-1"], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        eventually(lambda: len(refusals(stack)) > refused, "the old certificate refused")
        eventually(lambda: stack.fleet_synced() and reason(stack) != FALLBACK_REASON,
                   "the edge back on its new certificate", timeout=4 * CONNECTION_MAX_AGE_S)
        back = time.monotonic()
        eventually(lambda: len(traffic.sent_after(back)) >= CLIENTS, "the clients to go on")
    assert traffic.total() and traffic.failures() == {}, traffic.failed
    assert {(entry["peer_name"], entry["reason"]) for entry in refusals(stack)[refused:]} == {
        (EDGE.name, "the client certificate is revoked")}
    after = traffic.sent_after(back)
    assert [e for e in after if e.reason == FALLBACK_REASON] == [], "then ext_proc, all of them"
