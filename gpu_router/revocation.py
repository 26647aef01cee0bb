"""Revoked certificates: a CRL (crl.pem in the certs directory) signed by the fleet's CA.

A stolen edge key would otherwise work until its certificate expires (a year) or the CA is
replaced, and an edge certificate gets every provider key. `gpu-router certs revoke NAME` adds
NAME's certificate to the CRL and removes its pair from the directory, so the next
`certs init` or `up` issues the node a new one. The control plane and ext_proc read the CRL
(`--tls-crl`) and refuse a revoked certificate on every new stream; the control plane also ends
an open stream of one at its next message either way (Peer.revoked). They read the file again
when it changes, so revoking needs no restart.

The CRL is X.509 (RFC 5280), built and verified with `cryptography`: OpenSSL and Envoy read the
same file. Its signature must be the CA's: a CRL anyone could write could also un-revoke.
"""

from __future__ import annotations

import datetime
import functools
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gpu_router import pki

CRL_FILE = "crl.pem"
RELOAD_EVERY_S = 1.0
"""How often a Revocations looks at its file: a revocation counts within a second."""

_log = logging.getLogger(__name__)


class RevocationError(RuntimeError):
    """A CRL cannot be read or made; says which file and why."""


def read_crl(crl: Path, ca: Path) -> frozenset[int]:
    """The serial numbers `crl` revokes; RevocationError when it is not a PEM CRL signed by the
    CA in `ca` (a missing file is an error here: Revocations treats one as empty)."""
    return frozenset(entry.serial_number for entry in _revoked_entries(crl, ca))


def _revoked_entries(crl: Path, ca: Path) -> list[x509.RevokedCertificate]:
    try:
        revoked = x509.load_pem_x509_crl(crl.read_bytes())
    except (OSError, ValueError) as error:
        raise RevocationError(f"{crl}: not a readable PEM CRL ({error})") from error
    authority = x509.load_pem_x509_certificate(ca.read_bytes())
    if revoked.issuer != authority.subject or not revoked.is_signature_valid(
            authority.public_key()):  # type: ignore[arg-type]
        raise RevocationError(f"{crl}: not signed by the CA in {ca}")
    return list(revoked)


@functools.lru_cache(maxsize=256)
def certificate_serial(pem: bytes) -> int | None:
    """A peer certificate's serial number (cached: a fleet has few certificates); None when
    `pem` is not a certificate."""
    try:
        return x509.load_pem_x509_certificate(pem).serial_number
    except ValueError:
        return None


class Revocations:
    """The serials a CRL file revokes, read again when the file changes (looked at once a
    second at most). No file: nothing revoked, until one appears. A file that turns bad keeps
    the last good list and logs why; at start (open) a bad file is an error."""

    def __init__(self, crl: Path | None, ca: Path | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._crl, self._ca, self._clock = crl, ca, clock
        self._serials: frozenset[int] = frozenset()
        self._seen: tuple[int, int, int] | None = None
        self._looked_at = -RELOAD_EVERY_S

    @classmethod
    def open(cls, crl: Path | None, ca: Path | None) -> Revocations:
        """Revocations of `crl` (None: nothing is ever revoked), read now: RevocationError when
        the file is there and bad."""
        revocations = cls(crl, ca)
        revocations._reload(strict=True)
        return revocations

    def revoked(self, serial: int | None) -> bool:
        """Whether the certificate of this serial is revoked, as of at most a second ago."""
        now = self._clock()
        if now - self._looked_at >= RELOAD_EVERY_S:
            self._looked_at = now
            self._reload(strict=False)
        return serial in self._serials

    def _reload(self, *, strict: bool) -> None:
        if self._crl is None or self._ca is None:
            return
        try:
            info = self._crl.stat()
        except FileNotFoundError:
            self._serials, self._seen = frozenset(), None
            return
        seen = (info.st_ino, info.st_size, info.st_mtime_ns)
        if seen == self._seen:
            return
        try:
            self._serials = read_crl(self._crl, self._ca)
        except RevocationError as error:
            if strict:
                raise
            _log.error("crl_unreadable", extra={"path": str(self._crl), "error": str(error)})
        self._seen = seen  # a bad file is reported once, not every second


REVOCABLE = frozenset({pki.Role.EDGE, pki.Role.EXT_PROC})
"""The roles whose certificates the control plane's and ext_proc's ports check against the CRL
(no one checks the control plane's own against it)."""

NOTHING_REVOKED = Revocations(None, None)
"""For a port whose peers nobody revokes (and for tests)."""


def revoke(directory: Path, names: Iterable[str],
           now: datetime.datetime | None = None) -> tuple[Path, list[int]]:
    """Add the certificates of `names` (<name>.pem in `directory`) to its crl.pem, signed with
    its CA key, and remove their pairs so the next `certs init` or `up` issues new ones.
    (CRL path, each name's serial). RevocationError when a name has no certificate there, or
    the CA key is absent."""
    now = now or datetime.datetime.now(datetime.UTC)
    ca_path, ca_key_path = directory / pki.CA_FILE, directory / pki.CA_KEY_FILE
    if not ca_key_path.exists():
        raise RevocationError(f"{ca_key_path}: absent; only the CA's key signs a CRL")
    authority = x509.load_pem_x509_certificate(ca_path.read_bytes())
    key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    files = [pki.tls_files(directory, name) for name in names]
    for leaf in files:
        if not leaf.cert.exists():
            raise RevocationError(f"{leaf.cert}: no certificate of that name to revoke")
        identity = pki.certified_identity(leaf.cert.read_bytes())
        if identity is None or identity[0] not in REVOCABLE:
            raise RevocationError(f"{leaf.cert}: not an edge's or ext_proc's certificate (only "
                                  "the ports that take those read the CRL)")
    crl_path = directory / CRL_FILE
    kept = _revoked_entries(crl_path, ca_path) if crl_path.exists() else []
    known = {entry.serial_number for entry in kept}
    serials = [x509.load_pem_x509_certificate(leaf.cert.read_bytes()).serial_number
               for leaf in files]
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(authority.subject)
               .last_update(now)
               .next_update(authority.not_valid_after_utc))
    for entry in kept:  # with the dates they were revoked on
        builder = builder.add_revoked_certificate(entry)
    for serial in dict.fromkeys(s for s in serials if s not in known):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    crl = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    pki.write_file(crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    for leaf in files:
        for path in (leaf.cert, leaf.key):
            path.unlink(missing_ok=True)
    return crl_path, serials

