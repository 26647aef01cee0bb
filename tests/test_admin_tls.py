"""The admin API over HTTPS (the control plane's --http-tls-cert, --http-tls-key): the token never
crosses a network in the clear; a renewed pair is served from the next connection; the launcher
pins the certificate it gave; `gpu-router health --ca` checks it against a private CA."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import socket
import ssl
import threading
import urllib.error
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from edge_tls_fixtures import NOW, der, served_certificate, server_pair
from test_admin_http import TOKEN, FakeState

from control_plane.admin_http import AdminHttpServer, AdminTls, AdminTlsError
from control_plane.app import EXIT_FAILED
from control_plane.app import main as control_plane_main
from gpu_router import pki
from gpu_router.admin_token import bearer
from gpu_router.cli import main as cli_main
from gpu_router.processes import free_port, http_get, pinned_context


@contextlib.contextmanager
def serving(tls: AdminTls) -> Iterator[int]:
    """The port of an admin API serving over `tls`, on a loop of its own."""
    port = free_port()
    loop = asyncio.new_event_loop()
    server = AdminHttpServer("127.0.0.1", port, FakeState(), TOKEN, tls.context)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """(port, ca, cert): an admin API serving cert over HTTPS."""
    ca, cert, key = server_pair(tmp_path / "tls")
    with serving(AdminTls(cert, key)) as port:
        yield port, ca, cert


def test_a_renewed_pair_is_served_from_the_next_connection_and_a_bad_one_never(
    tmp_path: Path,
) -> None:
    _, cert, key = server_pair(tmp_path / "tls")
    tls = AdminTls(cert, key)
    first = der(cert)
    with serving(tls) as port:
        _, new_cert, new_key = server_pair(tmp_path / "next")
        for source, target in ((new_key, key), (new_cert, cert)):
            os.replace(source, target)
        assert served_certificate(port) == first  # nothing served anew until served
        tls.serve(tls.read())
        assert served_certificate(port) == der(cert) != first
        _, _, other_key = server_pair(tmp_path / "other")
        os.replace(other_key, key)
        with pytest.raises(AdminTlsError, match=f"{key}: not the key of the certificate"):
            tls.read()
        assert served_certificate(port) == der(cert)
        assert http_get(f"https://127.0.0.1:{port}/v1/policy", headers=bearer(TOKEN),
                        context=pinned_context(cert))[0] == 200


def test_https_only_with_the_token(served: tuple[int, Path, Path]) -> None:
    port, ca, cert = served
    url = f"https://127.0.0.1:{port}/v1/policy"
    assert http_get(url, headers=bearer(TOKEN), context=pinned_context(cert))[0] == 200
    assert http_get(url, context=ssl.create_default_context(cafile=str(ca)))[0] == 401
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    with pytest.raises((ConnectionError, http.client.HTTPException)) as failed:
        plain.request("GET", "/healthz")
        plain.getresponse().read()
    plain.close()
    assert not isinstance(failed.value, ConnectionRefusedError), "it listens, TLS only"


def handshake(port: int, newest: ssl.TLSVersion) -> str:
    """The version a client offering TLS 1.0 up to `newest` (every cipher) gets."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():  # the old versions are deprecated: offering them is the test
        warnings.simplefilter("ignore", DeprecationWarning)
        client.minimum_version, client.maximum_version = ssl.TLSVersion.TLSv1, newest
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            client.wrap_socket(raw) as tls:
        return str(tls.version())


def test_tls_1_2_or_later_only(served: tuple[int, Path, Path]) -> None:
    port = served[0]
    assert handshake(port, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    with pytest.raises(ssl.SSLError):  # refused: aiohttp closes without an alert
        handshake(port, ssl.TLSVersion.TLSv1_1)


def test_the_pin_refuses_another_certificate_of_the_same_ca(
    served: tuple[int, Path, Path], tmp_path: Path,
) -> None:
    """Whoever took the port with any other certificate, even one the same CA signed for the
    same names, is not sent the token."""
    port, ca_path, _ = served
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    ca_key = serialization.load_pem_private_key(
        (ca_path.parent / "ca-key.pem").read_bytes(), password=None)
    sibling, _ = pki.make_leaf(ca, ca_key, pki.Identity(pki.Role.CONTROL_PLANE, "edge"), NOW,
                               dns=["localhost"], ips=["127.0.0.1"])
    pinned = tmp_path / "sibling.pem"
    pinned.write_bytes(sibling.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(urllib.error.URLError) as refused:
        http_get(f"https://127.0.0.1:{port}/healthz", context=pinned_context(pinned))
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)


def test_gpu_router_health_checks_the_certificate_against_its_ca(
    served: tuple[int, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    port, ca, _ = served
    token = tmp_path / "admin-token"
    token.write_text(TOKEN)
    health = ["health", "--control-plane", f"https://127.0.0.1:{port}",
              "--admin-token-file", str(token), "--format", "json"]

    def run(argv: list[str]) -> int:
        with pytest.raises(SystemExit) as done:
            cli_main(argv)
        return int(done.value.code or 0)

    assert run([*health, "--ca", str(ca)]) == 0
    assert '"prov-a"' in capsys.readouterr().out
    assert run(health) == 1  # the system's CAs do not know this one
    assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
    assert run([*health, "--ca", str(tmp_path / "nowhere.pem")]) == 1
    assert f"--ca {tmp_path / 'nowhere.pem'}" in capsys.readouterr().err
    # Plain HTTP only on loopback: elsewhere the token would cross the network in the clear.
    remote = ["health", "--control-plane", "http://192.0.2.1:8080", "--admin-token-file",
              str(token)]
    assert run(remote) == 1
    assert "would carry the admin token in the clear" in capsys.readouterr().err


def test_an_unusable_pair_stops_the_control_plane_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    _, cert, _ = server_pair(tmp_path / "tls")
    _, _, other_key = server_pair(tmp_path / "other")
    with pytest.raises(AdminTlsError, match=f"{other_key}: not the key of the certificate"):
        AdminTls(cert, other_key)
    argv = ["--certs-dir", str(tmp_path / "certs"), "--no-accounting", "--xds-port",
            str(free_port()), "--http-port", str(free_port()),
            "--http-tls-cert", str(cert), "--http-tls-key", str(other_key)]
    assert control_plane_main(argv) == EXIT_FAILED
    assert "--http-tls-cert, --http-tls-key: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        control_plane_main(["--http-tls-cert", str(cert)])
    assert stopped.value.code == 2
    assert "--http-tls-cert and --http-tls-key go together" in capsys.readouterr().err
