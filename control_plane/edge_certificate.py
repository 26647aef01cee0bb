"""The certificate the edge listener serves to clients (`--edge-tls-cert`, `--edge-tls-key`).

Read and checked here, with every policy release (so a rotated pair rolls out like a rotated
provider key: control_plane/watch.py polls both files), and pushed to the edges over SDS, the
only way the control plane hands out secrets: only an authenticated edge certificate gets it.
A pair that is not PEM, whose key is not the certificate's, or whose certificate has expired
is refused with the file named, and the last good release keeps serving.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gpu_router.pki import same_key


class EdgeCertificateError(Exception):
    """The edge listener's certificate or key cannot be served; says which file and why."""


@dataclass(frozen=True, slots=True)
class ListenerCertificate:
    chain: bytes
    """PEM: the certificate, then any intermediates."""
    key: bytes = field(repr=False)


def read_listener_certificate(
    cert_path: Path, key_path: Path, now: datetime.datetime | None = None
) -> ListenerCertificate:
    """The pair, checked (EdgeCertificateError naming the file otherwise)."""
    now = now or datetime.datetime.now(datetime.UTC)
    chain, key = _read(cert_path), _read(key_path)
    try:
        certificates = x509.load_pem_x509_certificates(chain)
    except ValueError as error:
        raise EdgeCertificateError(f"{cert_path}: not a PEM certificate chain ({error})") from None
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise EdgeCertificateError(
            f"{key_path}: not an unencrypted PEM private key") from None
    leaf = certificates[0]
    if not same_key(leaf, private_key):  # type: ignore[arg-type]
        raise EdgeCertificateError(f"{key_path}: not the key of the certificate in {cert_path}")
    if leaf.not_valid_after_utc <= now:
        raise EdgeCertificateError(
            f"{cert_path}: expired {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    # The certificates alone, re-encoded: a file that also holds the key would otherwise put it
    # in the chain, which Envoy does not redact in /config_dump.
    served = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)
    return ListenerCertificate(served, key)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise EdgeCertificateError(f"{path}: cannot read: {error.strerror}") from None
