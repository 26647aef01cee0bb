"""Revoked certificates: a CRL (crl.pem in the certs directory) signed by the fleet's CA.

A stolen edge key would otherwise work until its certificate expires (a year) or the CA is
replaced, and an edge certificate gets every provider key. `gpu-router certs revoke NAME` adds
NAME's certificate to the CRL and removes its pair from the directory, so the next
`certs init` or `up` issues the node a new one. The control plane reads the CRL and refuses a
revoked certificate on every new stream, and ends an open stream of one at its next message
(Peer.revoked); it reads the file again when it changes, so revoking needs no restart. It sends
the CRL to every ext_proc replica over xDS (RevocationList, Revocations.learn), which refuses a
revoked edge on every new stream, and to every edge with the ext_proc cluster
(EdgeSettings.ext_proc_crl), so a revoked replica fails the edges' handshakes too. A replica may
also read a copy (`--tls-crl`, which `certs revoke --copy-to` writes): it counts while the
control plane is out of reach. The control plane's own certificate is not revoked here.

The CRL is X.509 (RFC 5280), built and verified with `cryptography`: OpenSSL reads the same file.
Nothing may un-revoke: a CRL must be the CA's (signature), and newer than the last one read
(its CRL number rises with every revocation); a CRL that disappears, turns unreadable or goes
back is logged and the last good list kept.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gpu_router import pki
from gpu_router.pem_files import PkiError, load_cert, load_key, write_file

CRL_FILE = "crl.pem"
RELOAD_EVERY_S = 1.0
"""How often a Revocations looks at its file: a revocation counts within a second."""
REVOKED = "the client certificate is revoked"
"""Why a port refused a revoked certificate (its `peer_refused` line's reason)."""
CLOCK_SKEW = datetime.timedelta(minutes=5)
"""A CRL counts from this long before it was made: Envoy refuses one from its future."""
REVOCABLE = frozenset({pki.Role.EDGE, pki.Role.EXT_PROC})
"""The roles whose certificates the control plane's and ext_proc's ports check against the CRL
(no one checks the control plane's own against it)."""

_log = logging.getLogger(__name__)


class RevocationError(RuntimeError):
    """A CRL cannot be read or made; says which file and why."""


@dataclass(frozen=True, slots=True)
class Crl:
    number: int
    """Its CRL number: every revocation makes a higher one (at least the Unix time)."""
    serials: frozenset[int]
    """The serial numbers it revokes."""
    pem: bytes
    """The file as read (the control plane hands it to the edges: EdgeSettings.ext_proc_crl)."""


NO_CRL = Crl(-1, frozenset(), b"")


def load_authority(ca: Path) -> x509.Certificate:
    """The CA certificate whose signature a CRL must carry; RevocationError naming the file."""
    try:
        return load_cert(ca)
    except PkiError as error:
        raise RevocationError(str(error)) from error


def read_crl(crl: Path, authority: x509.Certificate) -> Crl:
    """The CRL in `crl`; RevocationError when it is not a PEM CRL the CA signed, with a number
    (a missing file is an error here: Revocations treats one it never saw as empty)."""
    return _crl_of(crl, _load_crl(crl, authority))


def _crl_of(source: object, loaded: x509.CertificateRevocationList) -> Crl:
    try:
        number = loaded.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound as error:
        raise RevocationError(f"{source}: has no CRL number (`gpu-router certs revoke` gives "
                              "one)") from error
    # Re-encoded: whatever else the file holds does not reach the edges.
    pem = loaded.public_bytes(serialization.Encoding.PEM)
    return Crl(number, frozenset(entry.serial_number for entry in loaded), pem)


def _load_crl(crl: Path, authority: x509.Certificate) -> x509.CertificateRevocationList:
    try:
        pem = crl.read_bytes()
    except OSError as error:
        raise RevocationError(f"{crl}: not a readable PEM CRL ({error})") from error
    return _signed_crl(crl, pem, authority)


def _signed_crl(source: object, pem: bytes,
                authority: x509.Certificate) -> x509.CertificateRevocationList:
    try:
        loaded = x509.load_pem_x509_crl(pem)
    except ValueError as error:
        raise RevocationError(f"{source}: not a readable PEM CRL ({error})") from error
    if loaded.issuer != authority.subject or not loaded.is_signature_valid(
            authority.public_key()):  # type: ignore[arg-type]
        raise RevocationError(f"{source}: not signed by the fleet's CA")
    return loaded


class Revocations:
    """The serials the fleet's CRL revokes: from a file, read again when it changes (looked at
    once a second at most), and in ext_proc from the control plane too (learn). The CRL of the
    highest number either gave counts; none yet: nothing revoked. A file that turns bad,
    disappears or goes back to an older CRL keeps the last good list and logs why; at start
    (open) a bad file is an error."""

    def __init__(self, crl: Path | None, authority: x509.Certificate | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = crl
        """The CRL file (None: none, only what `learn` is given)."""
        self._authority, self._clock = authority, clock
        self._current = NO_CRL
        self._file_number = NO_CRL.number
        self._seen: tuple[int, int, int] | None = None
        self._looked_at = -RELOAD_EVERY_S

    @classmethod
    def open(cls, crl: Path | None, ca: Path,
             clock: Callable[[], float] = time.monotonic) -> Revocations:
        """Revocations of `crl` (None: no file) under the CA in `ca`, read now: RevocationError
        when the file is there and bad, or the CA cannot be read."""
        revocations = cls(crl, load_authority(ca), clock)
        revocations._reload(strict=True)
        return revocations

    def revoked(self, serial: int | None) -> bool:
        """Whether the certificate of this serial is revoked, as of at most a second ago."""
        now = self._clock()
        if now - self._looked_at >= RELOAD_EVERY_S:
            self._looked_at = now
            self._reload(strict=False)
        return serial in self._current.serials

    def current_pem(self) -> bytes:
        """The last good CRL as read (b"" with none), its file looked at again now: what the
        control plane sends every edge, which checks ext_proc's certificates against it."""
        self._looked_at = self._clock()
        self._reload(strict=False)
        return self._current.pem

    def learn(self, pem: bytes) -> bool:
        """Take a CRL the control plane sent (b"": it has none); whether it is now the one
        that counts. RevocationError when it is not a PEM CRL the CA signed, with a number; an
        older one than held is set aside (nothing un-revokes)."""
        if not pem:
            return False
        source = "the control plane's CRL"
        if self._authority is None:
            raise RevocationError(f"{source}: no CA to check it against")
        return self._take(_crl_of(source, _signed_crl(source, pem, self._authority)))

    def _take(self, crl: Crl) -> bool:
        if crl.number <= self._current.number:  # older, or the one held (a stream's reconnect)
            return False
        self._current = crl
        return True

    def _reload(self, *, strict: bool) -> None:
        if self.path is None or self._authority is None:
            return
        try:
            info = self.path.stat()
        except FileNotFoundError:
            if self._seen is not None:  # it was there: its list stays, reported once
                _log.error("crl_missing", extra={"path": str(self.path)})
                self._seen = None
            return
        seen = (info.st_ino, info.st_size, info.st_mtime_ns)
        if seen == self._seen:
            return
        self._seen = seen  # a bad file is reported once, not every second
        try:
            crl = read_crl(self.path, self._authority)
        except RevocationError as error:
            if strict:
                raise
            _log.error("crl_unreadable", extra={"path": str(self.path), "error": str(error)})
            return
        if crl.number < self._file_number:
            _log.error("crl_older", extra={"path": str(self.path), "number": crl.number,
                                           "kept_number": self._file_number})
            return
        self._file_number = crl.number
        self._take(crl)


NOTHING_REVOKED = Revocations(None, None)
"""For a port whose peers nobody revokes (and for tests)."""


def revoke(directory: Path, names: Iterable[str], copy_to: Iterable[Path] = (),
           now: datetime.datetime | None = None) -> tuple[Path, list[pki.CertifiedPeer]]:
    """Add the certificates of `names` (<name>.pem in `directory`, edges' or ext_proc
    replicas') to its crl.pem, signed with its CA key under the next CRL number, write the same
    file into each of `copy_to`, and remove their pairs so the next `certs init` or `up` issues
    new ones. (CRL path, whom each name's certificate named). RevocationError naming the file when a name has no
    certificate of those roles there, or the CA cannot sign; nothing is revoked then. One
    revocation at a time per directory (a lock): two at once would lose one's entries."""
    now = now or datetime.datetime.now(datetime.UTC)
    copy_to = list(copy_to)
    for place in copy_to:
        if not place.is_dir():
            raise RevocationError(f"{place}: not a directory to copy the CRL into")
    authority = load_authority(directory / pki.CA_FILE)
    try:
        key = load_key(directory / pki.CA_KEY_FILE)
    except PkiError as error:
        raise RevocationError(f"{error}; only the CA's key signs a CRL") from error
    if authority.not_valid_after_utc <= now:
        raise RevocationError(f"{directory / pki.CA_FILE}: the CA has expired")
    with _locked(directory):
        files = [pki.tls_files(directory, name) for name in names]
        revoked = [_revocable(leaf.cert) for leaf in files]
        crl_path = directory / CRL_FILE
        earlier = _load_crl(crl_path, authority) if crl_path.exists() else None
        # The time, so a CRL made after the file was lost still reads as newer.
        number = max(int(now.timestamp()),
                     0 if earlier is None else _crl_of(crl_path, earlier).number + 1)
        kept = [] if earlier is None else list(earlier)
        known = {entry.serial_number for entry in kept}
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(authority.subject)
                   .last_update(now - CLOCK_SKEW)  # an edge whose clock is behind
                   .next_update(authority.not_valid_after_utc)
                   .add_extension(x509.CRLNumber(number), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       key.public_key()), critical=False))  # type: ignore[arg-type]
        for entry in kept:  # with the dates they were revoked on
            builder = builder.add_revoked_certificate(entry)
        for serial in dict.fromkeys(p.serial for p in revoked if p.serial not in known):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
                .build())
        try:
            signed = builder.sign(key, pki.signing_digest(key))  # type: ignore[arg-type]
        except (TypeError, ValueError) as error:
            raise RevocationError(f"{directory / pki.CA_KEY_FILE}: cannot sign a CRL ({error})"
                                  ) from error
        pem = signed.public_bytes(serialization.Encoding.PEM)
        # The copies first: a failed one leaves the directory's CRL, and its pairs, as before.
        for place in (*copy_to, directory):
            try:
                write_file(place / CRL_FILE, pem, 0o644)
            except OSError as error:
                raise RevocationError(f"{place / CRL_FILE}: cannot write ({error})") from error
        for leaf in files:
            for path in (leaf.cert, leaf.key):
                path.unlink(missing_ok=True)
    return crl_path, revoked


def _revocable(cert: Path) -> pki.CertifiedPeer:
    """Whom the edge's or ext_proc replica's certificate in `cert` names, and its serial."""
    if not cert.exists():
        raise RevocationError(f"{cert}: no certificate of that name to revoke")
    peer = pki.certified_peer(cert.read_bytes())
    if peer is None or peer.role not in REVOCABLE:
        raise RevocationError(f"{cert}: not an edge's or ext_proc's certificate (only the "
                              "ports that take those read the CRL)")
    return peer


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on the directory's .crl.lock while revoking."""
    descriptor = os.open(directory / ".crl.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock
