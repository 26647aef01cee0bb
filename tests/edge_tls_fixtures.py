"""Certificates a client trusts for the edge listener's TLS: a CA of the test's own and a
server certificate for 127.0.0.1 (gpu_router/pki.py makes both); what a port serves; a fleet
certificate renewed as `certs init` renews one."""

from __future__ import annotations

import datetime
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gpu_router import pki
from gpu_router.pem_files import load_cert, load_key, write_cert, write_key

NOW = datetime.datetime.now(datetime.UTC)


def server_pair(directory: Path, *, now: datetime.datetime = NOW) -> tuple[Path, Path, Path]:
    """(ca.pem, edge.pem, edge-key.pem): a new CA and a certificate for 127.0.0.1/localhost;
    the CA's key beside them (ca-key.pem), for a test that signs another."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = pki.make_ca(now)
    leaf, key = pki.make_leaf(ca, ca_key, pki.Identity(pki.Role.CONTROL_PLANE, "edge"), now,
                              dns=["localhost"], ips=["127.0.0.1"])
    paths = directory / "ca.pem", directory / "edge.pem", directory / "edge-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    for path, private in ((paths[2], key), (directory / "ca-key.pem", ca_key)):
        path.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def client_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def served_certificate(port: int, client: pki.TlsFiles | None = None) -> bytes:
    """The DER certificate a port on 127.0.0.1 presents to a new connection (looked at, not
    verified), made with `client`'s pair when given (the fleet's gRPC ports ask for one)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw) as tls:
        return tls.getpeercert(binary_form=True) or b""


def reissue(files: pki.TlsFiles, identity: pki.Identity, *, dns: tuple[str, ...] = (),
            ips: tuple[str, ...] = ()) -> x509.Certificate:
    """A new pair for `identity` from the CA beside `files` (its key in ca-key.pem), written over
    `files` as `certs init` writes them: each file renamed into place, the key first."""
    cert, key = pki.make_leaf(load_cert(files.ca), load_key(files.ca.parent / pki.CA_KEY_FILE),
                              identity, datetime.datetime.now(datetime.UTC), dns=dns, ips=ips)
    write_key(files.key, key)
    write_cert(files.cert, cert)
    return cert


def der(pem: Path) -> bytes:
    """The first certificate of a PEM file, as served_certificate gives it."""
    return ssl.PEM_cert_to_DER_cert(pem.read_text())
