"""gpu_router/pki.py: the CA and the per-role certificates behind the control plane's mTLS."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509

from gpu_router import pem_files, pki
from gpu_router.fleet_certs import fleet

NOW = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
EDGE = pki.Identity(pki.Role.EDGE, "edge-1")
EXT_PROC = pki.Identity(pki.Role.EXT_PROC, "ext-proc-1")
SERVER = pki.Identity(pki.Role.CONTROL_PLANE, "control-plane")


def contents(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_spiffe_ids_name_the_role_and_only_ours_parse() -> None:
    assert EDGE.spiffe_id == "spiffe://gpu-router/edge/edge-1"
    assert SERVER.spiffe_id == "spiffe://gpu-router/control-plane"
    assert pki.role_of(EXT_PROC.spiffe_id) == (pki.Role.EXT_PROC, "ext-proc-1")
    assert pki.role_of(SERVER.spiffe_id) == (pki.Role.CONTROL_PLANE, "control-plane")
    others = ("spiffe://elsewhere/edge/x", "spiffe://gpu-router/edge/", "spiffe://gpu-router/x/y",
              "spiffe://gpu-router/edge/a/b", "https://gpu-router/edge/x")
    for other in others:
        assert pki.role_of(other) is None, other


def test_leaves_are_signed_by_the_ca_with_their_role_and_the_server_its_addresses() -> None:
    ca, ca_key = pki.make_ca(NOW)
    edge, _ = pki.make_leaf(ca, ca_key, EDGE, NOW)
    server, _ = pki.make_leaf(ca, ca_key, SERVER, NOW, dns=["control-plane"], ips=["127.0.0.1"])
    assert pki.leaf_problem(edge, ca, EDGE, NOW) is None
    assert pki.leaf_problem(edge, ca, EXT_PROC, NOW) == f"has no URI SAN {EXT_PROC.spiffe_id}"
    other_ca, _ = pki.make_ca(NOW)
    assert pki.leaf_problem(edge, other_ca, EDGE, NOW) == "is not signed by the CA"
    later = NOW + pki.LEAF_VALIDITY - pki.RENEW_BEFORE + datetime.timedelta(days=1)
    assert pki.leaf_problem(edge, ca, EDGE, later).startswith("expires ")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["control-plane"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert pki.uri_sans(server) == [SERVER.spiffe_id]


def test_ensure_makes_what_is_missing_and_never_rewrites_a_valid_file(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    files = pki.ensure(directory, [SERVER, EDGE], now=NOW)
    assert files["edge-1"] == pki.TlsFiles(
        directory / "ca.pem", directory / "edge-1.pem", directory / "edge-1-key.pem"
    )
    assert (directory / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert (directory / "edge-1-key.pem").stat().st_mode & 0o777 == 0o600
    first = contents(directory)

    pki.ensure(directory, [SERVER, EDGE], now=NOW)
    assert contents(directory) == first

    pki.ensure(directory, [SERVER, EDGE, EXT_PROC], now=NOW)
    grown = contents(directory)
    assert {k: v for k, v in grown.items() if k in first} == first
    assert pki.role_of(pki.uri_sans(load(directory / "ext-proc-1.pem"))[0]) == (
        pki.Role.EXT_PROC, "ext-proc-1")


def test_ensure_reissues_a_wrong_or_expiring_leaf_but_keeps_the_ca(tmp_path: Path) -> None:
    pki.ensure(tmp_path, [EDGE], now=NOW)
    ca = (tmp_path / "ca.pem").read_bytes()
    (tmp_path / "edge-1.pem").write_bytes((tmp_path / "ca.pem").read_bytes())  # not the leaf
    pki.ensure(tmp_path, [EDGE], now=NOW)
    assert pki.uri_sans(load(tmp_path / "edge-1.pem")) == [EDGE.spiffe_id]

    renewed_at = NOW + pki.LEAF_VALIDITY - datetime.timedelta(days=1)
    before = (tmp_path / "edge-1.pem").read_bytes()
    pki.ensure(tmp_path, [EDGE], now=renewed_at)
    assert (tmp_path / "edge-1.pem").read_bytes() != before
    assert (tmp_path / "ca.pem").read_bytes() == ca


def test_ensure_adds_server_addresses_asked_for_later(tmp_path: Path) -> None:
    pki.ensure(tmp_path, [SERVER], now=NOW)
    pki.ensure(tmp_path, [SERVER], dns=["cp.example"], ips=(), now=NOW)
    sans = load(tmp_path / "control-plane.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["cp.example"]


def test_a_ca_of_ones_own_without_its_key_needs_every_leaf_supplied(tmp_path: Path) -> None:
    """Bring your own: the files are used as they are; a missing one cannot be made."""
    own = tmp_path / "own"
    pki.ensure(own, [EDGE], now=NOW)
    (own / "ca-key.pem").unlink()
    before = contents(own)
    assert pki.ensure(own, [EDGE], now=NOW)["edge-1"].cert == own / "edge-1.pem"
    assert contents(own) == before
    with pytest.raises(pki.PkiError, match=r"ext-proc-1\.pem: is missing, and .*ca-key\.pem is absent"):
        pki.ensure(own, [EXT_PROC], now=NOW)


def usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_ext_proc_certificates_also_serve_its_port_and_older_ones_are_reissued(
    tmp_path: Path,
) -> None:
    """An ext_proc replica serves Envoy over mutual TLS: server auth, and a DNS name its own
    healthcheck asks for, which is none of the control plane's (no replica can pass for it).
    Edges only ever connect: client auth only."""
    ca, ca_key = pki.make_ca(NOW)
    replica, _ = pki.make_leaf(ca, ca_key, EXT_PROC, NOW)
    edge, _ = pki.make_leaf(ca, ca_key, EDGE, NOW)
    server_auth = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
    assert server_auth in usages(replica) and server_auth not in usages(edge)
    sans = replica.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [pki.EXT_PROC_SERVER_NAME]
    assert pki.EXT_PROC_SERVER_NAME not in pki.SERVER_DNS
    assert not sans.get_values_for_type(x509.IPAddress)
    assert pki.leaf_problem(replica, ca, EXT_PROC, NOW) is None

    # A replica certificate made before ext_proc served TLS: client auth, no DNS name.
    directory = tmp_path / "certs"
    files = pki.ensure(directory, [EXT_PROC], now=NOW)["ext-proc-1"]
    old, old_key = pki.make_leaf(load(files.ca), pem_files.load_key(directory / pki.CA_KEY_FILE),
                                 EDGE, NOW)
    client_only = (
        x509.CertificateBuilder(
            subject_name=old.subject, issuer_name=old.issuer, public_key=old_key.public_key(),
            serial_number=old.serial_number, not_valid_before=old.not_valid_before_utc,
            not_valid_after=old.not_valid_after_utc)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(EXT_PROC.spiffe_id)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(pem_files.load_key(directory / pki.CA_KEY_FILE), pki.hashes.SHA256())
    )
    assert pki.leaf_problem(client_only, load(files.ca), EXT_PROC, NOW) == (
        "lacks server auth (extended key usage), which this role's port needs")
    pem_files.write_cert(files.cert, client_only)
    pem_files.write_key(files.key, old_key)
    pki.ensure(directory, [EXT_PROC], now=NOW)
    renewed = load(files.cert)
    assert server_auth in usages(renewed)
    assert renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == [pki.EXT_PROC_SERVER_NAME]


def test_a_certificate_speaks_for_one_identity_or_none() -> None:
    """The rule both the control plane's port and ext_proc's admit by."""
    edge, other_edge = "spiffe://gpu-router/edge/a", "spiffe://gpu-router/edge/b"
    replica = "spiffe://gpu-router/ext-proc/x"
    assert pki.sole_identity([edge, pki.EXT_PROC_SERVER_NAME]) == (pki.Role.EDGE, "a")
    assert pki.sole_identity([edge, edge]) == (pki.Role.EDGE, "a")
    for names in ([edge, other_edge], [edge, replica], [], ["spiffe://gpu-router/edgeX/a"],
                  ["spiffe://gpu-router/edge/a/b"], ["edge-1"]):
        assert pki.sole_identity(names) is None, names


@pytest.mark.parametrize("edges, ext_procs, redis, says", [
    (["ca"], [], [], "'ca' cannot name a certificate"),
    ([], ["crl"], [], "'crl' cannot name a certificate"),
    ([], [], ["control-plane"], "'control-plane' cannot name a certificate"),
    (["control-plane-key"], [], [], "'control-plane-key' cannot name a certificate"),
    (["dup"], [], ["dup"], "'dup' cannot name a certificate: its files would be those of"),
    ([], [], ["localhost"], "--redis localhost: a Redis needs a DNS name of its own"),
    ([], [], ["ext-proc.gpu-router"], "a Redis needs a DNS name of its own"),
    ([], [], ["10.0.0.7"], "--redis 10.0.0.7: a Redis needs a DNS name of its own"),
    ([], ["default"], [], "--ext-proc default: also the replica's Redis user: 'default' cannot"),
    ([], ["two words"], [], "--ext-proc two words: also the replica's Redis user"),
])
def test_a_fleet_refuses_names_that_would_overwrite_a_file_or_pose_as_a_server(
    edges: list[str], ext_procs: list[str], redis: list[str], says: str,
) -> None:
    """`ca` would overwrite the CA; a Redis named as the control plane could pose as it to a
    client that checks that name (ext_proc dialling it); a replica's name is its Redis user's,
    written into redis.conf."""
    with pytest.raises(pki.PkiError, match=says):
        fleet(edges, ext_procs, redis)


def test_a_redis_certificate_serves_its_dns_name(tmp_path: Path) -> None:
    files = pki.ensure(tmp_path, fleet([], [], ["redis"]), now=NOW)["redis"]
    cert = load(files.cert)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["redis"]
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://gpu-router/redis/redis"]
    assert pki.certified_peer(files.cert.read_bytes()) is None  # no gRPC port admits it
