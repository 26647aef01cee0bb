"""Renders envoy/bootstrap.yaml for one edge node: its id, admin address, control plane address,
and, when several nodes share a machine, the port its edge listener should take."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

BOOTSTRAP_TEMPLATE = Path(__file__).resolve().parent.parent / "envoy" / "bootstrap.yaml"
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


def render_bootstrap(node: EdgeNode) -> dict:
    config = yaml.safe_load(BOOTSTRAP_TEMPLATE.read_text())
    config["node"]["id"] = node.node_id
    if node.edge_port is not None:
        config["node"]["metadata"] = {NODE_METADATA_NAMESPACE: {"edge_port": node.edge_port}}
    config["admin"]["address"]["socket_address"] = {
        "address": node.admin_host,
        "port_value": node.admin_port,
    }
    (xds,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "gpu-router.xds"]
    address = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    address["socket_address"] = {"address": node.xds_host, "port_value": node.xds_port}
    return config


def write_bootstrap(node: EdgeNode, path: Path) -> Path:
    path.write_text(yaml.safe_dump(render_bootstrap(node), sort_keys=False))
    return path
