"""An edge without client keys lets anyone who reaches it spend the operator's provider
credits, so `gpu-router up` binds it beyond loopback only when the policy declares clients or
the operator says --allow-open-edge."""

from __future__ import annotations

import ipaddress

from control_plane.policy.model import RoutingConfig


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def open_edge_refusal(host: str, config: RoutingConfig, allow_open_edge: bool) -> str | None:
    """Why the edge must not listen on `host` with this policy; None when it may."""
    if config.clients or allow_open_edge or is_loopback(host):
        return None
    return (f"refusing to bind the edge to {host}: the policy declares no clients, so anyone "
            "who reaches it could spend your provider credits. Declare clients (gpu-router keys "
            "new NAME prints a key and its policy entry) or pass --allow-open-edge")
