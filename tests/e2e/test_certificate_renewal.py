"""Renewing the fleet's certificates while a stack runs: every process takes its new pair
without a restart, from the next connection on. The edge Envoy reads its own certificate and
the fleet's CA from SDS files it watches (gpu_router/bootstrap.py; the control plane points the
node's ext_proc cluster at them), the control plane's and ext_proc's gRPC ports hand each new
connection the pair their files hold (gpu_router/grpc_tls.py). 64 clients send throughout and
none fails."""

from __future__ import annotations

import datetime
import json
import ssl
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from polling import eventually
from stack_harness import BATCH, CLIENTS, MODEL, Traffic, chat
from test_grpc_tls import served

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
    status, headers, body = chat(stack, MODEL, BATCH)
    assert status == 200 and headers["x-gpu-router-reason"] != FALLBACK_REASON, body
    assert ssl.PEM_cert_to_DER_cert(client.cert.read_text()) == der(edge)
