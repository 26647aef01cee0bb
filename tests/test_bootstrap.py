"""An edge's bootstrap with a secrets directory (gpu_router/bootstrap.py): its certificate and
the fleet's CA are read from SDS files it watches, none from static secrets, and the control
plane is told where they are; the real Envoy accepts it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from control_plane.translate.edge_secret_files import CONNECTION_MAX_AGE_S, SECRET_TYPE_URL
from control_plane.translate.names import EDGE_CERTIFICATE_SECRET, FLEET_CA_SECRET
from gpu_router import pki
from gpu_router.bootstrap import XDS_CLUSTER, EdgeNode, write_bootstrap
from gpu_router.processes import envoy_binary


def test_a_node_with_a_secrets_directory_reads_its_secrets_from_files_it_watches(
        tmp_path: Path) -> None:
    tls = pki.ensure(tmp_path / "certs", [pki.Identity(pki.Role.EDGE, "edge-1")])["edge-1"]
    secrets = tmp_path / "edge-1.secrets"
    path = write_bootstrap(EdgeNode(tls=tls, secrets_dir=secrets), tmp_path / "edge-1.yaml")
    config = yaml.safe_load(path.read_text())

    assert "secrets" not in config["static_resources"]
    assert config["node"]["metadata"] == {"gpu_router": {"secrets_dir": str(secrets)}}
    [xds] = [c for c in config["static_resources"]["clusters"] if c["name"] == XDS_CLUSTER]
    context = xds["transport_socket"]["typed_config"]["common_tls_context"]
    [certificate] = context["tls_certificate_sds_secret_configs"]
    combined = context["combined_validation_context"]
    files = {config["name"]: Path(config["sds_config"]["path_config_source"]["path"])
             for config in (certificate, combined["validation_context_sds_secret_config"])}
    assert files == {name: secrets / f"{name}.sds.yaml"
                     for name in (EDGE_CERTIFICATE_SECRET, FLEET_CA_SECRET)}
    options = xds["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["common_http_protocol_options"] == {
        "max_connection_duration": f"{CONNECTION_MAX_AGE_S}s"}  # a replaced certificate's end
    # The control plane's identity is still checked, against the CA the file names.
    assert combined["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://gpu-router/control-plane"}}]
    assert [yaml.safe_load(files[name].read_text()) for name in files] == [
        {"resources": [{"@type": SECRET_TYPE_URL, "name": EDGE_CERTIFICATE_SECRET,
                        "tls_certificate": {"certificate_chain": {"filename": str(tls.cert)},
                                            "private_key": {"filename": str(tls.key)}}}]},
        {"resources": [{"@type": SECRET_TYPE_URL, "name": FLEET_CA_SECRET,
                        "validation_context": {"trusted_ca": {"filename": str(tls.ca)}}}]}]

    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_without_a_secrets_directory_the_secrets_are_static(tmp_path: Path) -> None:
    tls = pki.ensure(tmp_path / "certs", [pki.Identity(pki.Role.EDGE, "edge-1")])["edge-1"]
    config = yaml.safe_load(write_bootstrap(EdgeNode(tls=tls), tmp_path / "b.yaml").read_text())
    assert [s["name"] for s in config["static_resources"]["secrets"]] == [
        EDGE_CERTIFICATE_SECRET, FLEET_CA_SECRET]
    assert "metadata" not in config["node"]
    assert not list(tmp_path.glob("*.sds.yaml")) and not list(tmp_path.glob("*/*.sds.yaml"))
