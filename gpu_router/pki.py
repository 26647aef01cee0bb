"""The local certificate authority behind the control plane's mutual TLS.

Every process that talks to the control plane's gRPC port (xDS, access logs, load reports)
presents a certificate from one CA, and its role comes from that certificate's SPIFFE URI
SAN: spiffe://gpu-router/edge/<node>, spiffe://gpu-router/ext-proc/<replica>, or
spiffe://gpu-router/control-plane for the server (which also carries DNS and IP SANs so
clients can check the address they dialled). `make_ca` and `make_leaf` are pure; `ensure`
writes a certs directory, keeping every file that is still valid, so a user's own CA and
certificates ("bring your own") are used as they are and nothing valid is ever overwritten.

Layout of a certs directory: ca.pem (+ ca-key.pem when we made the CA), and per process
<name>.pem / <name>-key.pem, e.g. control-plane.pem, edge-1.pem, ext-proc-1.pem (the files are
read and written by pem_files.py; crl.pem by revocation.py).
"""

from __future__ import annotations

import datetime
import enum
import functools
import ipaddress
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gpu_router.pem_files import (
    PkiError,
    load_cert,
    load_key,
    same_key,
    write_cert,
    write_key,
)

TRUST_DOMAIN = "gpu-router"
CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=365)
RENEW_BEFORE = datetime.timedelta(days=30)
"""A leaf expiring sooner than this is replaced by `ensure` (when it holds the CA key)."""
SERVER_DNS = ("localhost", "control-plane")
SERVER_IPS = ("127.0.0.1", "::1")
EXT_PROC_SERVER_NAME = "ext-proc.gpu-router"
"""The DNS SAN of every ext_proc certificate, which also serves the ext_proc port: what a gRPC
client that checks host names (ext_proc's own healthcheck) asks for. Envoy checks the SPIFFE id
instead. No other role's certificate carries it, and it is none of the control plane's names."""


class Role(enum.Enum):
    """Who a certificate speaks for; the path segment of its SPIFFE id."""

    EDGE = "edge"
    EXT_PROC = "ext-proc"
    CONTROL_PLANE = "control-plane"
    REDIS = "redis"
    """Compose's Redis (TLS to the ext_proc replicas): it serves, and no port admits it."""


SERVING_ROLES = frozenset({Role.CONTROL_PLANE, Role.EXT_PROC, Role.REDIS})
"""The roles whose certificates also serve a port (server auth)."""


def role_prefix(role: Role) -> str:
    """The start of every SPIFFE id of an edge or ext_proc certificate (each ends in a name)."""
    return f"spiffe://{TRUST_DOMAIN}/{role.value}/"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """What one process needs for mutual TLS: the CA that vouches for its peers, its own pair."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(CA, certificate chain, private key) as PEM bytes, for grpc's ssl credentials."""
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


@dataclass(frozen=True, slots=True)
class Identity:
    """A leaf to issue: its role and name (the file stem and the SPIFFE id's last segment)."""

    role: Role
    name: str

    @property
    def spiffe_id(self) -> str:
        if self.role is Role.CONTROL_PLANE:
            return f"spiffe://{TRUST_DOMAIN}/{Role.CONTROL_PLANE.value}"
        return role_prefix(self.role) + self.name


def role_of(spiffe_id: str) -> tuple[Role, str] | None:
    """(role, name) of one of our SPIFFE ids; None for anything else."""
    prefix = f"spiffe://{TRUST_DOMAIN}/"
    if not spiffe_id.startswith(prefix):
        return None
    kind, _, name = spiffe_id[len(prefix):].partition("/")
    if kind == Role.CONTROL_PLANE.value and not name:
        return Role.CONTROL_PLANE, Role.CONTROL_PLANE.value
    if kind in (Role.EDGE.value, Role.EXT_PROC.value) and name and "/" not in name:
        return Role(kind), name
    return None


def sole_identity(names: Iterable[str]) -> tuple[Role, str] | None:
    """(role, name) when exactly one of our SPIFFE ids is among a certificate's `names`; None
    for none or several (a certificate may not speak for two roles or two nodes). The control
    plane's port and ext_proc's both admit peers by this rule."""
    found = {identity for name in names if (identity := role_of(name)) is not None}
    return found.pop() if len(found) == 1 else None


def peer_certificate(auth_context: Mapping[str, Sequence[bytes]]) -> bytes | None:
    """The gRPC peer's certificate (PEM) from its auth_context(); None without one."""
    pems = auth_context.get("x509_pem_cert")
    return pems[0] if pems else None


@dataclass(frozen=True, slots=True)
class CertifiedPeer:
    """Who a peer's certificate names (its sole SPIFFE id) and which certificate it is."""

    role: Role
    name: str
    serial: int
    """What a CRL names (gpu_router/revocation.py)."""


@functools.lru_cache(maxsize=256)
def certified_peer(pem: bytes | None) -> CertifiedPeer | None:
    """The peer a certificate (auth_context()["x509_pem_cert"][0]) names: the sole SPIFFE id
    among its URI SANs; None for none. Never gRPC's peer_identities(), which also lists DNS
    names and, without SANs, the subject's CN: text a certificate may carry for any role.
    Cached: a fleet has few certificates, and parsing one costs more than a request."""
    if not pem:
        return None
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    identity = sole_identity(uri_sans(cert))
    return None if identity is None else CertifiedPeer(*identity, cert.serial_number)


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return extension.value.get_values_for_type(x509.UniformResourceIdentifier)


def make_ca(now: datetime.datetime, common_name: str = "gpu-router local CA") -> tuple[
    x509.Certificate, ec.EllipticCurvePrivateKey
]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(name, name, key.public_key(), now, CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    identity: Identity,
    now: datetime.datetime,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for `identity` signed by the CA: client auth for every role, server auth
    too for the roles that serve (the control plane, ext_proc), with `dns`/`ips` as extra SANs
    (the control plane's addresses; ext_proc's get EXT_PROC_SERVER_NAME)."""
    key = ec.generate_private_key(ec.SECP256R1())
    dns = _dns_names(identity, dns)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.spiffe_id)]
    sans += [x509.DNSName(name) for name in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if identity.role in SERVING_ROLES:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)])
    validity = min(LEAF_VALIDITY, ca_cert.not_valid_after_utc - now)  # never outlives its CA
    cert = (
        _builder(subject, ca_cert.subject, key.public_key(), now, validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, signing_digest(ca_key))
    )
    return cert, key


def signing_digest(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    """Ed25519 and Ed448 sign without a separate digest; every other key type with SHA-256."""
    return None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else (
        hashes.SHA256()
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
    validity: datetime.timedelta,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # small clock skew between hosts
        .not_valid_after(now + validity)
    )


def leaf_problem(
    cert: x509.Certificate, ca_cert: x509.Certificate, identity: Identity, now: datetime.datetime
) -> str | None:
    """Why `cert` cannot serve as `identity` under this CA (None: it can)."""
    if identity.spiffe_id not in uri_sans(cert):
        return f"has no URI SAN {identity.spiffe_id}"
    if cert.issuer != ca_cert.subject:
        return "is not issued by the CA"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return "is not signed by the CA"
    if cert.not_valid_after_utc - RENEW_BEFORE < now:
        return f"expires {cert.not_valid_after_utc:%Y-%m-%d}"
    if identity.role in SERVING_ROLES and not _serves(cert):
        return "lacks server auth (extended key usage), which this role's port needs"
    return None


def _serves(cert: x509.Certificate) -> bool:
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True  # no extended key usage: any use
    return ExtendedKeyUsageOID.SERVER_AUTH in usages


def tls_files(directory: Path, name: str) -> TlsFiles:
    return TlsFiles(directory / CA_FILE, directory / f"{name}.pem", directory / f"{name}-key.pem")


def ensure(
    directory: Path,
    identities: Iterable[Identity],
    *,
    dns: Sequence[str] = SERVER_DNS,
    ips: Sequence[str] = SERVER_IPS,
    now: datetime.datetime | None = None,
) -> dict[str, TlsFiles]:
    """Make whatever is missing or unusable in `directory` for these identities; name -> files.

    The CA is made only when ca.pem is absent. A leaf is (re)issued when absent, not for its
    identity, not signed by this CA, or expiring within RENEW_BEFORE; that needs ca-key.pem,
    so with a CA of one's own and no key here, every leaf must be supplied (PkiError otherwise).
    `dns`/`ips` are the control plane certificate's extra SANs.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca_path, ca_key_path = directory / CA_FILE, directory / CA_KEY_FILE
    if not ca_path.exists():
        ca_cert, ca_key = make_ca(now)
        write_key(ca_key_path, ca_key)
        write_cert(ca_path, ca_cert)
    ca_cert = load_cert(ca_path)
    if ca_cert.not_valid_after_utc < now:
        raise PkiError(f"{ca_path}: the CA expired {ca_cert.not_valid_after_utc:%Y-%m-%d}; "
                       f"remove the directory's files to make a new CA")
    out: dict[str, TlsFiles] = {}
    for identity in identities:
        files = tls_files(directory, identity.name)
        # The control plane's addresses are its own extra SANs (ext_proc's name: _dns_names).
        extra_dns, extra_ips = (dns, ips) if identity.role is Role.CONTROL_PLANE else ((), ())
        problem = _existing_problem(files, ca_cert, identity, now, dns=extra_dns, ips=extra_ips)
        if problem is not None:
            if not ca_key_path.exists():
                raise PkiError(f"{files.cert}: {problem}, and {ca_key_path} is absent to issue one")
            cert, key = make_leaf(ca_cert, load_key(ca_key_path), identity, now,
                                  dns=extra_dns, ips=extra_ips)
            write_key(files.key, key)
            write_cert(files.cert, cert)
        out[identity.name] = files
    return out


def _existing_problem(
    files: TlsFiles,
    ca_cert: x509.Certificate,
    identity: Identity,
    now: datetime.datetime,
    dns: Sequence[str],
    ips: Sequence[str],
) -> str | None:
    if not files.cert.exists() or not files.key.exists():
        return "is missing"
    try:
        cert = load_cert(files.cert)
        key = load_key(files.key)
    except PkiError as error:
        return str(error)
    if not same_key(cert, key):
        return "does not match its key"
    missing = _missing_addresses(cert, _dns_names(identity, dns), ips)
    if missing:
        return f"lacks the SANs {', '.join(missing)}"
    return leaf_problem(cert, ca_cert, identity, now)


def pair_problem(files: TlsFiles) -> str | None:
    """Why a process cannot present `files` (unreadable, not PEM, or a key that is not the
    certificate's), naming the file; None when it can."""
    try:
        cert, key = load_cert(files.cert), load_key(files.key)
        load_cert(files.ca)
    except PkiError as error:
        return str(error)
    return None if same_key(cert, key) else f"{files.key}: not the key of {files.cert}"


def _dns_names(identity: Identity, dns: Sequence[str]) -> tuple[str, ...]:
    """`dns` and, for an ext_proc replica, the name its own healthcheck asks for; for a Redis,
    its name, the host its clients dial and check."""
    if identity.role is Role.EXT_PROC:
        return (*dns, EXT_PROC_SERVER_NAME)
    return (*dns, identity.name) if identity.role is Role.REDIS else tuple(dns)


def _missing_addresses(cert: x509.Certificate, dns: Sequence[str], ips: Sequence[str]) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [*dns, *ips]
    names = set(sans.get_values_for_type(x509.DNSName))
    addresses = set(sans.get_values_for_type(x509.IPAddress))
    return [name for name in dns if name not in names] + [
        ip for ip in ips if ipaddress.ip_address(ip) not in addresses
    ]
