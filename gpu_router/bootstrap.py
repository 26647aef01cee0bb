"""Renders envoy/bootstrap.yaml for one edge node: its id, admin address, control plane address,
the certificate files of its mutual TLS to the control plane and (as secrets the control
plane's ext_proc cluster names) to ext_proc, and, when several nodes share a machine, the port
its edge listener should take.

The secrets are either static (read once, at start) or, with a secrets directory, SDS files
Envoy watches along with the certificate files they name, so that a renewed certificate is used
from the next connection on without a restart (control_plane/translate/edge_secret_files.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from google.protobuf import json_format

from control_plane.translate.edge_secret_files import (
    SECRET_TYPE_URL,
    sds_file,
    sds_secret_config,
)
from control_plane.translate.names import EDGE_CERTIFICATE_SECRET, FLEET_CA_SECRET
from gpu_router.pem_files import write_file
from gpu_router.pki import TlsFiles

BOOTSTRAP_TEMPLATE = Path(__file__).resolve().parent.parent / "envoy" / "bootstrap.yaml"
XDS_CLUSTER = "gpu-router.xds"
DEFAULT_CERTS = Path("/etc/gpu-router/certs")
DEFAULT_EDGE_TLS = TlsFiles(
    DEFAULT_CERTS / "ca.pem", DEFAULT_CERTS / "edge.pem", DEFAULT_CERTS / "edge-key.pem"
)
"""The template's certificate files (the Compose edges' volume is mounted there)."""
DEFAULT_SECRETS = Path("/etc/gpu-router/secrets")
"""Where the Compose edges' SDS files are (deploy/compose/secrets, mounted there)."""
NODE_METADATA_NAMESPACE = "gpu_router"
"""node.metadata key the control plane reads (control_plane/xds/node.py spells it too)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeNode:
    node_id: str = "edge-1"
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    xds_host: str = "127.0.0.1"
    xds_port: int = 18000
    edge_port: int | None = None
    """Asks the control plane for the edge listener on this port (node metadata); None: the
    control plane's --edge-port, as for every node without the metadata."""
    tls: TlsFiles | None = DEFAULT_EDGE_TLS
    """The CA and this node's edge certificate and key (named by node_id). None: plaintext xDS
    and no static secrets, which the control plane refuses and without which Envoy refuses its
    ext_proc cluster; only for tests against a plaintext stand-in (tests/xds_fixtures.py)."""
    secrets_dir: Path | None = None
    """Where this node's SDS files are (write_bootstrap writes them): Envoy watches them and
    the certificate files they name, and the control plane has the node's ext_proc cluster read
    them (node metadata). None: static secrets, which a renewed certificate takes a restart to
    replace."""


def render_bootstrap(node: EdgeNode) -> dict:
    config = yaml.safe_load(BOOTSTRAP_TEMPLATE.read_text())
    config["node"]["id"] = node.node_id
    metadata: dict[str, int | str] = {}
    if node.edge_port is not None:
        metadata["edge_port"] = node.edge_port
    if node.tls is not None and node.secrets_dir is not None:
        metadata["secrets_dir"] = str(node.secrets_dir)
    if metadata:
        config["node"]["metadata"] = {NODE_METADATA_NAMESPACE: metadata}
    config["admin"]["address"]["socket_address"] = {
        "address": node.admin_host,
        "port_value": node.admin_port,
    }
    (xds,) = [c for c in config["static_resources"]["clusters"] if c["name"] == XDS_CLUSTER]
    address = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    address["socket_address"] = {"address": node.xds_host, "port_value": node.xds_port}
    if node.tls is None:
        del xds["transport_socket"]
        del config["static_resources"]["secrets"]
    elif node.secrets_dir is None:
        xds["transport_socket"] = xds_transport_socket(node.tls, xds["transport_socket"])
        config["static_resources"]["secrets"] = edge_secrets(node.tls)
    else:
        xds["transport_socket"] = _watched_transport_socket(node.secrets_dir,
                                                            xds["transport_socket"])
        del config["static_resources"]["secrets"]
    return config


def secret_files(tls: TlsFiles, directory: Path) -> dict[Path, dict]:
    """The SDS files of a secrets directory (path -> content): one secret each, as Envoy's
    file-based SDS reads them, naming this node's certificate and key, and the fleet's CA."""
    return {Path(sds_file(str(directory), secret["name"])): {
        "resources": [{"@type": SECRET_TYPE_URL, **secret}]} for secret in edge_secrets(tls)}


def _watched_transport_socket(directory: Path, template: dict) -> dict:
    """The xDS cluster's transport socket reading both secrets from the SDS files in
    `directory`, checking the control plane's SAN as the template does."""
    context = template["typed_config"]["common_tls_context"]
    del context["tls_certificates"]
    checks = context.pop("validation_context")
    del checks["trusted_ca"]
    context["tls_certificate_sds_secret_configs"] = [_sds(EDGE_CERTIFICATE_SECRET, directory)]
    context["combined_validation_context"] = {
        "default_validation_context": checks,
        "validation_context_sds_secret_config": _sds(FLEET_CA_SECRET, directory)}
    return template


def _sds(name: str, directory: Path) -> dict:
    return json_format.MessageToDict(sds_secret_config(name, str(directory)),
                                     preserving_proto_field_name=True)


def edge_secrets(tls: TlsFiles) -> list[dict]:
    """The static secrets the control plane's ext_proc cluster names (its mutual TLS to the
    replicas): this node's certificate and key, and the fleet's CA."""
    return [
        {"name": EDGE_CERTIFICATE_SECRET, "tls_certificate": _certificate(tls)},
        {"name": FLEET_CA_SECRET, "validation_context": {"trusted_ca": {"filename": str(tls.ca)}}},
    ]


def xds_transport_socket(tls: TlsFiles, template: dict | None = None) -> dict:
    """The xDS cluster's transport socket (the template's, by default) with these files."""
    if template is None:
        config = yaml.safe_load(BOOTSTRAP_TEMPLATE.read_text())
        [xds] = [c for c in config["static_resources"]["clusters"] if c["name"] == XDS_CLUSTER]
        template = xds["transport_socket"]
    context = template["typed_config"]["common_tls_context"]
    context["tls_certificates"] = [_certificate(tls)]
    context["validation_context"]["trusted_ca"] = {"filename": str(tls.ca)}
    return template


def _certificate(tls: TlsFiles) -> dict:
    """This node's certificate and key as Envoy's TlsCertificate reads them from files."""
    return {"certificate_chain": {"filename": str(tls.cert)},
            "private_key": {"filename": str(tls.key)}}


def write_bootstrap(node: EdgeNode, path: Path) -> Path:
    """The bootstrap at `path`, and the node's SDS files when it has a secrets directory."""
    if node.tls is not None and node.secrets_dir is not None:
        node.secrets_dir.mkdir(parents=True, exist_ok=True)
        for file, content in secret_files(node.tls, node.secrets_dir).items():
            write_file(file, yaml.safe_dump(content, sort_keys=False).encode(), 0o644)
    path.write_text(yaml.safe_dump(render_bootstrap(node), sort_keys=False))
    return path
