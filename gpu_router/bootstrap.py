"""Renders envoy/bootstrap.yaml for one edge node: its id, admin port and control plane address."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

BOOTSTRAP_TEMPLATE = Path(__file__).resolve().parent.parent / "envoy" / "bootstrap.yaml"


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeNode:
    node_id: str = "edge-1"
    admin_port: int = 9901
    xds_host: str = "127.0.0.1"
    xds_port: int = 18000


def render_bootstrap(node: EdgeNode) -> dict:
    config = yaml.safe_load(BOOTSTRAP_TEMPLATE.read_text())
    config["node"]["id"] = node.node_id
    config["admin"]["address"]["socket_address"]["port_value"] = node.admin_port
    (xds,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "gpu-router.xds"]
    address = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    address["socket_address"] = {"address": node.xds_host, "port_value": node.xds_port}
    return config


def write_bootstrap(node: EdgeNode, path: Path) -> Path:
    path.write_text(yaml.safe_dump(render_bootstrap(node), sort_keys=False))
    return path
