"""Certificates a client trusts for the edge listener's TLS: a CA of the test's own and a
server certificate for 127.0.0.1 (gpu_router/pki.py makes both)."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from gpu_router import pki

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
