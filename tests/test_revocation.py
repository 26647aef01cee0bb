"""The fleet's CRL: made by `certs revoke`, read by Revocations (gpu_router/revocation.py)."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gpu_router import pem_files, pki
from gpu_router.cli import main as cli_main
from gpu_router.redis_service import ensure_password, password_file
from gpu_router.revocation import (
    CRL_FILE,
    RELOAD_EVERY_S,
    RevocationError,
    Revocations,
    load_authority,
    read_crl,
    revoke,
)

T0 = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
EDGES = [pki.Identity(pki.Role.EDGE, name) for name in ("edge-1", "edge-2", "edge-3")]


def serial(files: pki.TlsFiles) -> int:
    return x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, pki.TlsFiles]:
    return pki.ensure(tmp_path / "certs", [*EDGES, pki.Identity(pki.Role.EXT_PROC, "x")], now=T0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_revoking_adds_to_the_ca_signed_crl_and_removes_the_pair(
    certs: dict[str, pki.TlsFiles],
) -> None:
    directory = certs["edge-1"].ca.parent
    first, second, replica = (serial(certs[name]) for name in ("edge-1", "edge-2", "x"))
    crl, revoked = revoke(directory, ["edge-1"], now=T0)
    serials = [peer.serial for peer in revoked]
    assert (crl, serials) == (directory / CRL_FILE, [first])
    assert not certs["edge-1"].cert.exists() and not certs["edge-1"].key.exists()
    later = T0 + datetime.timedelta(days=3)
    assert [(p.role, p.name, p.serial) for p in revoke(directory, ["edge-2", "x"], now=later)[1]] == [
        (pki.Role.EDGE, "edge-2", second), (pki.Role.EXT_PROC, "x", replica)]
    assert read_crl(crl, load_authority(certs["edge-1"].ca)).serials == {first, second, replica}
    dates = {entry.serial_number: entry.revocation_date_utc
             for entry in x509.load_pem_x509_crl(crl.read_bytes())}
    assert (dates[first], dates[second]) == (T0, later)  # the earlier one keeps its date
    assert certs["edge-3"].cert.exists()
    # The next start issues the revoked name a new certificate, which the CRL does not name.
    reissued = pki.ensure(directory, [EDGES[0]], now=T0)["edge-1"]
    assert serial(reissued) not in read_crl(crl, load_authority(reissued.ca)).serials


@pytest.mark.parametrize("name, says", [
    ("edge-9", "no certificate of that name"),
    ("control-plane", "not an edge's or ext_proc's certificate"),
])
def test_what_cannot_be_revoked_is_an_error_naming_the_file(
    certs: dict[str, pki.TlsFiles], name: str, says: str,
) -> None:
    directory = certs["edge-1"].ca.parent
    pki.ensure(directory, [pki.Identity(pki.Role.CONTROL_PLANE, "control-plane")], now=T0)
    with pytest.raises(RevocationError, match=f"{name}.pem: {says}"):
        revoke(directory, ["edge-1", name], now=T0)
    assert certs["edge-1"].cert.exists()  # nothing revoked when one name cannot be
    assert not (directory / CRL_FILE).exists()


def test_only_the_ca_key_signs_a_crl(certs: dict[str, pki.TlsFiles], tmp_path: Path) -> None:
    directory = certs["edge-1"].ca.parent
    (directory / pki.CA_KEY_FILE).unlink()
    with pytest.raises(RevocationError, match="ca-key.pem: not a readable .* only the CA's key"):
        revoke(directory, ["edge-1"], now=T0)
    # A CRL made by another CA (its own key, a file of the same name) is refused.
    other = pki.ensure(tmp_path / "other", [EDGES[0]], now=T0)["edge-1"]
    crl, _ = revoke(other.ca.parent, ["edge-1"], now=T0)
    with pytest.raises(RevocationError, match=f"{crl}: not signed by the fleet's CA"):
        read_crl(crl, load_authority(certs["edge-1"].ca))
    with pytest.raises(RevocationError, match="not signed by the fleet.s CA"):
        Revocations.open(crl, certs["edge-1"].ca)
    (tmp_path / "garbage.pem").write_text("not a CRL")
    with pytest.raises(RevocationError, match="garbage.pem: not a readable PEM CRL"):
        Revocations.open(tmp_path / "garbage.pem", certs["edge-1"].ca)


def test_a_revocation_counts_within_a_second_and_nothing_un_revokes(
    certs: dict[str, pki.TlsFiles], caplog: pytest.LogCaptureFixture,
) -> None:
    """A file that turns bad, disappears, or is put back as an older CRL (each the CA's) keeps
    the last good list: only a newer CRL replaces it."""
    directory = certs["edge-1"].ca.parent
    crl = directory / CRL_FILE
    edge_1, edge_2 = serial(certs["edge-1"]), serial(certs["edge-2"])
    clock = Clock()
    revocations = Revocations.open(crl, certs["edge-1"].ca, clock)
    assert not revocations.revoked(edge_1)  # no file yet: nothing revoked
    revoke(directory, ["edge-1"], now=T0)
    older = crl.read_bytes()
    clock.now += RELOAD_EVERY_S / 2
    assert not revocations.revoked(edge_1)  # not looked at again yet
    clock.now += RELOAD_EVERY_S / 2
    assert revocations.revoked(edge_1) and not revocations.revoked(edge_2)
    revoke(directory, ["edge-2"], now=T0)
    clock.now += RELOAD_EVERY_S
    assert revocations.revoked(edge_1) and revocations.revoked(edge_2)
    with caplog.at_level(logging.ERROR, logger="gpu_router.revocation"):
        for replaced in (older, b"half a file", None):
            if replaced is None:
                crl.unlink()
            else:
                crl.write_bytes(replaced)
            clock.now += RELOAD_EVERY_S
            assert revocations.revoked(edge_1) and revocations.revoked(edge_2), replaced
    assert [r.msg for r in caplog.records] == ["crl_older", "crl_unreadable", "crl_missing"]


def test_the_control_planes_crl_and_the_file_the_newer_counts(
    certs: dict[str, pki.TlsFiles], caplog: pytest.LogCaptureFixture,
) -> None:
    """An ext_proc replica learns the CRL over xDS and may read a copy too: whichever is newer
    counts, an older one from the control plane changes nothing, and only the file going back
    on itself is reported."""
    directory = certs["edge-1"].ca.parent
    crl = directory / CRL_FILE
    edge_1, edge_2 = serial(certs["edge-1"]), serial(certs["edge-2"])
    revoke(directory, ["edge-1"], now=T0)
    older = crl.read_bytes()
    revoke(directory, ["edge-2"], now=T0)
    newer = crl.read_bytes()
    crl.unlink()
    clock = Clock()
    revocations = Revocations.open(crl, certs["edge-1"].ca, clock)
    with caplog.at_level(logging.ERROR, logger="gpu_router.revocation"):
        assert revocations.learn(older) and revocations.revoked(edge_1)
        assert not revocations.revoked(edge_2)
        assert revocations.learn(newer) and revocations.revoked(edge_2)
        assert not revocations.learn(older) and revocations.revoked(edge_2)
        assert not revocations.learn(b"")
        crl.write_bytes(older)  # a copy behind the control plane's is not a step back
        clock.now += RELOAD_EVERY_S
        assert revocations.revoked(edge_1) and revocations.revoked(edge_2)
        assert not caplog.records
        crl.write_bytes(newer)
        clock.now += RELOAD_EVERY_S
        assert revocations.revoked(edge_2)
        crl.write_bytes(older)
        clock.now += RELOAD_EVERY_S
        assert revocations.revoked(edge_1) and revocations.revoked(edge_2)
    assert [r.msg for r in caplog.records] == ["crl_older"]
    with pytest.raises(RevocationError, match="the control plane's CRL: not a readable PEM CRL"):
        revocations.learn(b"half a file")


def test_the_command_revokes_and_names_what_it_cannot(
    certs: dict[str, pki.TlsFiles], capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    directory = certs["edge-1"].ca.parent
    revoked = serial(certs["edge-1"])
    ext_proc_host = tmp_path / "ext-proc-certs"
    ext_proc_host.mkdir()
    with pytest.raises(SystemExit) as done:
        cli_main(["certs", "revoke", "--dir", str(directory), "--copy-to", str(ext_proc_host),
                  "edge-1"])
    assert done.value.code == 0
    assert f"revoked edge-1: serial {revoked:x}" in capsys.readouterr().out
    assert (ext_proc_host / CRL_FILE).read_bytes() == (directory / CRL_FILE).read_bytes()
    assert read_crl(directory / CRL_FILE, load_authority(certs["edge-1"].ca)).serials == {revoked}
    with pytest.raises(SystemExit) as done:
        cli_main(["certs", "revoke", "--dir", str(directory), "edge-1"])
    assert done.value.code == 1
    assert "edge-1.pem: no certificate of that name to revoke" in capsys.readouterr().err


def test_a_crl_without_a_number_or_past_its_ca_is_refused(
    certs: dict[str, pki.TlsFiles], tmp_path: Path,
) -> None:
    """Without a CRL number an older CRL could not be told from a newer one; a CA that has
    expired signs nothing."""
    directory = certs["edge-1"].ca.parent
    authority = load_authority(certs["edge-1"].ca)
    unnumbered = (x509.CertificateRevocationListBuilder().issuer_name(authority.subject)
                  .last_update(T0).next_update(T0 + datetime.timedelta(days=1))
                  .sign(pem_files.load_key(directory / pki.CA_KEY_FILE), hashes.SHA256()))
    path = tmp_path / CRL_FILE
    path.write_bytes(unnumbered.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(RevocationError, match=f"{path}: has no CRL number"):
        Revocations.open(path, certs["edge-1"].ca)
    with pytest.raises(RevocationError, match="ca.pem: the CA has expired"):
        revoke(directory, ["edge-1"], now=T0 + datetime.timedelta(days=3651))


def test_revoking_a_replica_retires_its_redis_password(
    certs: dict[str, pki.TlsFiles], capsys: pytest.CaptureFixture[str],
) -> None:
    """Redis reads no CRL: a replica's Redis password goes with its certificate (the next
    `certs init` or `up` makes a new one), and no other."""
    directory = certs["x"].ca.parent
    ensure_password(directory, "x"), ensure_password(directory)
    mine, default = password_file(directory, "x"), password_file(directory)
    for name in ("edge-1", "x"):
        with pytest.raises(SystemExit) as done:
            cli_main(["certs", "revoke", "--dir", str(directory), name])
        assert done.value.code == 0
        said = capsys.readouterr().out
        assert ("x: Redis password removed" in said) == (name == "x"), said
        assert mine.exists() == (name != "x")
    assert default.exists()
