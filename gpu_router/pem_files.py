"""Reading and writing the PEM files of a certs directory (gpu_router/pki.py): certificates, keys
and CRLs, each written atomically with the mode it needs; errors name the file."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes


class PkiError(RuntimeError):
    """A certs directory cannot be used as it is, and cannot be completed; says which file and why."""


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def same_key(cert: x509.Certificate, key: CertificateIssuerPrivateKeyTypes) -> bool:
    """Whether `key` is the private key of `cert`."""
    return key.public_key().public_bytes(*_SPKI) == cert.public_key().public_bytes(*_SPKI)


def load_cert(path: Path) -> x509.Certificate:
    """The PEM certificate in `path`; PkiError naming the file when it cannot be read."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as error:
        raise PkiError(f"{path}: not a readable PEM certificate: {error}") from error


def load_key(path: Path) -> CertificateIssuerPrivateKeyTypes:
    """A CA's or a leaf's key: ours are EC P-256, one brought along may be RSA or Ed25519."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise PkiError(f"{path}: not a readable unencrypted PEM private key: {error}") from error
    if not isinstance(key, CertificateIssuerPrivateKeyTypes):
        raise PkiError(f"{path}: a {type(key).__name__} cannot sign certificates")
    return key


def write_cert(path: Path, cert: x509.Certificate) -> None:
    """Readable by all (0644): a certificate is public."""
    write_file(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """The owner's only (0600), unencrypted: the process reading it has no one to ask."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_file(path, pem, 0o600)


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically, so a process starting meanwhile reads the old file or the new, never half."""
    partial = path.with_name(f".{path.name}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(partial, mode)
    os.replace(partial, path)
