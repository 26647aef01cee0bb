"""Renders envoy/bootstrap.yaml for one edge node: its id, admin address, control plane address,
the certificate files of its mutual TLS to the control plane and (as static secrets the control
plane's ext_proc cluster names) to ext_proc, and, when several nodes share a machine, the port
its edge listener should take."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from control_plane.translate.names import EDGE_CERTIFICATE_SECRET, FLEET_CA_SECRET
from gpu_router.pki import TlsFiles

BOOTSTRAP_TEMPLATE = Path(__file__).resolve().parent.parent / "envoy" / "bootstrap.yaml"
XDS_CLUSTER = "gpu-router.xds"
DEFAULT_CERTS = Path("/etc/gpu-router/certs")
DEFAULT_EDGE_TLS = TlsFiles(
    DEFAULT_CERTS / "ca.pem", DEFAULT_CERTS / "edge.pem", DEFAULT_CERTS / "edge-key.pem"
)
"""The template's certificate files (the Compose edges' volume is mounted there)."""
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


def render_bootstrap(node: EdgeNode) -> dict:
    config = yaml.safe_load(BOOTSTRAP_TEMPLATE.read_text())
    config["node"]["id"] = node.node_id
    if node.edge_port is not None:
        config["node"]["metadata"] = {NODE_METADATA_NAMESPACE: {"edge_port": node.edge_port}}
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
    else:
        xds["transport_socket"] = xds_transport_socket(node.tls, xds["transport_socket"])
        config["static_resources"]["secrets"] = edge_secrets(node.tls)
    return config


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
    path.write_text(yaml.safe_dump(render_bootstrap(node), sort_keys=False))
    return path
