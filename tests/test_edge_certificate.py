"""The edge listener's certificate: read and checked by the control plane, served over SDS."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from edge_tls_fixtures import server_pair
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from translate_fixtures import routing_config

from control_plane.edge_certificate import EdgeCertificateError, read_listener_certificate
from control_plane.translate import EdgeSettings, TranslationError, translate
from control_plane.translate.listeners import edge_listener


def test_a_good_pair_is_read_whole(tmp_path: Path) -> None:
    _, cert, key = server_pair(tmp_path)
    pair = read_listener_certificate(cert, key)
    assert (pair.chain, pair.key) == (cert.read_bytes(), key.read_bytes())
    assert "PRIVATE" not in repr(pair)


def test_a_key_kept_in_the_certificate_file_never_goes_into_the_chain(tmp_path: Path) -> None:
    """Envoy redacts a secret's private key in /config_dump, not its certificate chain."""
    _, cert, key = server_pair(tmp_path)
    for combined in (cert.read_bytes() + key.read_bytes(), key.read_bytes() + cert.read_bytes()):
        both = tmp_path / "both.pem"
        both.write_bytes(combined)
        pair = read_listener_certificate(both, key)
        assert pair.chain == cert.read_bytes() and b"PRIVATE" not in pair.chain


def test_an_unusable_pair_is_refused_naming_the_file(tmp_path: Path) -> None:
    ca, cert, key = server_pair(tmp_path / "one")
    _, _, other_key = server_pair(tmp_path / "two")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not pem")
    cases = [
        ((tmp_path / "missing.pem", key), "missing.pem: cannot read"),
        ((garbage, key), "garbage.pem: not a PEM certificate chain"),
        ((cert, garbage), "garbage.pem: not an unencrypted PEM private key"),
        ((cert, other_key), f"{other_key}: not the key of the certificate in {cert}"),
        ((ca, key), "not the key of the certificate"),
    ]
    for (cert_path, key_path), says in cases:
        with pytest.raises(EdgeCertificateError, match=says.replace("(", r"\(")):
            read_listener_certificate(cert_path, key_path)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=400)
    with pytest.raises(EdgeCertificateError, match=f"{cert}: expired "):
        read_listener_certificate(cert, key, now=later)


def listener_tls(settings: EdgeSettings) -> tls_pb2.DownstreamTlsContext | None:
    [chain] = edge_listener(settings).filter_chains
    if not chain.HasField("transport_socket"):
        return None
    context = tls_pb2.DownstreamTlsContext()
    assert chain.transport_socket.typed_config.Unpack(context)
    assert chain.filters[0].typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR)
    return context


def test_the_listener_serves_tls_only_with_the_certificate_from_sds(tmp_path: Path) -> None:
    assert listener_tls(EdgeSettings()) is None  # plain HTTP by default
    context = listener_tls(EdgeSettings(edge_tls=True))
    assert context is not None
    common = context.common_tls_context
    assert list(common.alpn_protocols) == ["h2", "http/1.1"]
    [source] = common.tls_certificate_sds_secret_configs
    assert source.name == "gpu-router.edge-listener-certificate"
    assert source.sds_config.HasField("ads")  # pushed by the control plane, rotated live

    _, cert, key = server_pair(tmp_path)
    pair = read_listener_certificate(cert, key)
    config = routing_config()
    secrets = translate(config, EdgeSettings(edge_tls=True), {}, pair).secrets
    served = secrets["gpu-router.edge-listener-certificate"].tls_certificate
    assert (served.certificate_chain.inline_bytes, served.private_key.inline_bytes) == (
        pair.chain, pair.key)
    assert "gpu-router.edge-listener-certificate" not in translate(config, EdgeSettings(), {}).secrets
    with pytest.raises(TranslationError, match="no listener certificate"):
        translate(config, EdgeSettings(edge_tls=True), {})
    with pytest.raises(TranslationError, match="the edge serves plain HTTP"):
        translate(config, EdgeSettings(), {}, pair)
