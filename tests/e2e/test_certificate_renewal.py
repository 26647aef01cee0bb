"""Renewing the fleet's certificates while a stack runs: every process takes its new pair
without a restart, from the next connection on. The edge Envoy reads its own certificate and
the fleet's CA from SDS files it watches (gpu_router/bootstrap.py; the control plane points the
node's ext_proc cluster at them), the control plane's and ext_proc's gRPC ports hand each new
connection the pair their files hold (gpu_router/grpc_tls.py). 64 clients send throughout and
none fails."""

from __future__ import annotations

import datetime
import json
import shutil
import ssl
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from polling import eventually
from stack_harness import BATCH, CLI, CLIENTS, MODEL, Traffic, chat, default_stack
from test_grpc_tls import served

from control_plane.translate.edge_secret_files import CONNECTION_MAX_AGE_S
from control_plane.translate.fallback_routes import FALLBACK_REASON
from gpu_router import pki
from gpu_router.pem_files import load_cert, load_key, write_cert, write_key
from gpu_router.processes import http_get
from gpu_router.stack import Stack

EDGE = pki.Identity(pki.Role.EDGE, "edge-1")
CONTROL_PLANE = pki.Identity(pki.Role.CONTROL_PLANE, pki.Role.CONTROL_PLANE.value)
REPLICA = pki.Identity(pki.Role.EXT_PROC, "ext-proc-1")


def reissue(stack: Stack, identity: pki.Identity) -> x509.Certificate:
    """A new pair for `identity` from the stack's CA with the SANs `gpu-router up` gives it,
    written over the old as `certs init` writes (each file renamed into place, key first)."""
    certs = stack.certs
    extra = ({"dns": pki.SERVER_DNS, "ips": pki.SERVER_IPS}
             if identity.role is pki.Role.CONTROL_PLANE else {})
    cert, key = pki.make_leaf(load_cert(certs / pki.CA_FILE), load_key(certs / pki.CA_KEY_FILE),
                              identity, datetime.datetime.now(datetime.UTC), **extra)
    files = pki.tls_files(certs, identity.name)
    write_key(files.key, key)
    write_cert(files.cert, cert)
    return cert


def edge_serials(stack: Stack) -> list[int]:
    """The serial of the certificate in each of the edge's client TLS contexts (the xDS
    cluster's and the ext_proc cluster's), as its admin's /certs shows them (in hex, with a
    leading zero where the serial's encoding has one)."""
    status, body = http_get(stack.edges[0].admin.url("/certs"))
    assert status == 200
    return [int(chain["serial_number"], 16) for context in json.loads(body)["certificates"]
            for chain in context["cert_chain"]]


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_the_fleet_takes_renewed_certificates_without_a_restart(stack: Stack) -> None:
    pids = {name: process.pid for name, process in stack.processes.items()}
    before = edge_serials(stack)
    assert before == [load_cert(stack.certs / "edge-1.pem").serial_number] * 2
    with Traffic(stack, MODEL, BATCH, threads=CLIENTS) as traffic:
        edge = reissue(stack, EDGE)
        control_plane, replica = reissue(stack, CONTROL_PLANE), reissue(stack, REPLICA)
        eventually(lambda: edge_serials(stack) == [edge.serial_number] * 2,
                   "the edge to take its renewed certificate in both contexts")
        client = pki.tls_files(stack.certs, EDGE.name)
        for port, cert in ((stack.ports.xds, control_plane), (stack.ports.ext_proc, replica)):
            eventually(lambda port=port, cert=cert: served(port, client) == der(cert),
                       f"port {port} to serve its renewed certificate")
        renewed = time.monotonic()
        eventually(lambda: len(traffic.sent_after(renewed)) >= CLIENTS, "the clients to go on")
    assert traffic.total() and traffic.failures() == {}, traffic.failed
    assert {name: process.pid for name, process in stack.processes.items()} == pids
    assert reason(stack) != FALLBACK_REASON
    assert ssl.PEM_cert_to_DER_cert(client.cert.read_text()) == der(edge)


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
    edge = reissue(stack, EDGE)
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


def refusals(stack: Stack) -> list[dict]:
    lines = stack.processes["control-plane"].log_path.read_text().splitlines()
    return [json.loads(line) for line in lines if '"peer_refused"' in line]


def reason(stack: Stack) -> str:
    status, headers, body = chat(stack, MODEL, BATCH)
    assert status == 200, body  # served either way: by ext_proc's decision or the fallback
    return headers["x-gpu-router-reason"]
