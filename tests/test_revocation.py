"""The fleet's CRL: made by `certs revoke`, read by Revocations (gpu_router/revocation.py)."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import pytest
from cryptography import x509

from gpu_router import pki
from gpu_router.cli import main as cli_main
from gpu_router.revocation import (
    CRL_FILE,
    RELOAD_EVERY_S,
    RevocationError,
    Revocations,
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
    crl, serials = revoke(directory, ["edge-1"], now=T0)
    assert (crl, serials) == (directory / CRL_FILE, [first])
    assert not certs["edge-1"].cert.exists() and not certs["edge-1"].key.exists()
    later = T0 + datetime.timedelta(days=3)
    assert revoke(directory, ["edge-2", "x"], now=later)[1] == [second, replica]
    assert read_crl(crl, certs["edge-1"].ca) == {first, second, replica}
    dates = {entry.serial_number: entry.revocation_date_utc
             for entry in x509.load_pem_x509_crl(crl.read_bytes())}
    assert (dates[first], dates[second]) == (T0, later)  # the earlier one keeps its date
    assert certs["edge-3"].cert.exists()
    # The next start issues the revoked name a new certificate, which the CRL does not name.
    reissued = pki.ensure(directory, [EDGES[0]], now=T0)["edge-1"]
    assert serial(reissued) not in read_crl(crl, reissued.ca)


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
    with pytest.raises(RevocationError, match="ca-key.pem: absent"):
        revoke(directory, ["edge-1"], now=T0)
    # A CRL made by another CA (its own key, a file of the same name) is refused.
    other = pki.ensure(tmp_path / "other", [EDGES[0]], now=T0)["edge-1"]
    crl, _ = revoke(other.ca.parent, ["edge-1"], now=T0)
    with pytest.raises(RevocationError, match=f"{crl}: not signed by the CA in"):
        read_crl(crl, certs["edge-1"].ca)
    with pytest.raises(RevocationError, match="not signed by the CA"):
        Revocations.open(crl, certs["edge-1"].ca)
    (tmp_path / "garbage.pem").write_text("not a CRL")
    with pytest.raises(RevocationError, match="garbage.pem: not a readable PEM CRL"):
        Revocations.open(tmp_path / "garbage.pem", certs["edge-1"].ca)


def test_a_revocation_counts_within_a_second_and_a_bad_file_keeps_the_last_good(
    certs: dict[str, pki.TlsFiles], caplog: pytest.LogCaptureFixture,
) -> None:
    directory = certs["edge-1"].ca.parent
    edge_1, edge_2 = serial(certs["edge-1"]), serial(certs["edge-2"])
    clock = Clock()
    revocations = Revocations(directory / CRL_FILE, certs["edge-1"].ca, clock)
    assert not revocations.revoked(edge_1)  # no file yet: nothing revoked
    revoke(directory, ["edge-1"], now=T0)
    clock.now += RELOAD_EVERY_S / 2
    assert not revocations.revoked(edge_1)  # not looked at again yet
    clock.now += RELOAD_EVERY_S / 2
    assert revocations.revoked(edge_1) and not revocations.revoked(edge_2)
    (directory / CRL_FILE).write_text("half a file")
    clock.now += RELOAD_EVERY_S
    with caplog.at_level(logging.ERROR, logger="gpu_router.revocation"):
        assert revocations.revoked(edge_1)  # the last good list
    assert [r.msg for r in caplog.records] == ["crl_unreadable"]
    (directory / CRL_FILE).unlink()
    clock.now += RELOAD_EVERY_S
    assert not revocations.revoked(edge_1)  # the file removed: nothing revoked


def test_the_command_revokes_and_names_what_it_cannot(
    certs: dict[str, pki.TlsFiles], capsys: pytest.CaptureFixture[str],
) -> None:
    directory = certs["edge-1"].ca.parent
    revoked = serial(certs["edge-1"])
    with pytest.raises(SystemExit) as done:
        cli_main(["certs", "revoke", "--dir", str(directory), "edge-1"])
    assert done.value.code == 0
    assert f"revoked edge-1: serial {revoked:x}" in capsys.readouterr().out
    assert read_crl(directory / CRL_FILE, certs["edge-1"].ca) == {revoked}
    with pytest.raises(SystemExit) as done:
        cli_main(["certs", "revoke", "--dir", str(directory), "edge-1"])
    assert done.value.code == 1
    assert "edge-1.pem: no certificate of that name to revoke" in capsys.readouterr().err
