"""What the control plane says about its nodes (GET /v1/xds): which edges and ext_proc workers
run the config it serves now. Pure functions over that JSON, for the Stack's ready checks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

EDGE_NODE_CLUSTER = "gpu-router-edge"
EXT_PROC_NODE_CLUSTER = "gpu-router-ext-proc"
_LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
_CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
_ROUTING_POLICY_TYPE = "type.googleapis.com/gpu_router.api.v1.RoutingPolicy"

Nodes = list[dict[str, Any]]


def acked_current(node: dict[str, Any], type_url: str) -> bool:
    state = node["types"].get(type_url)
    return state is not None and state["acked_version"] == state["current_version"] != ""


def policy_holders(nodes: Nodes) -> set[str]:
    """Ids of the ext_proc nodes that ACKed the routing policy the control plane serves now."""
    return {
        node["id"]
        for node in nodes
        if node["cluster"] == EXT_PROC_NODE_CLUSTER and acked_current(node, _ROUTING_POLICY_TYPE)
    }


def fleet_synced(nodes: Nodes, edge_ids: Iterable[str], workers: int) -> bool:
    """Whether every edge in `edge_ids` runs the control plane's listener and clusters, and at
    least `workers` ext_proc workers its routing policy."""
    synced_edges = {
        node["id"]
        for node in nodes
        if node["cluster"] == EDGE_NODE_CLUSTER
        and all(acked_current(node, t) for t in (_LISTENER_TYPE, _CLUSTER_TYPE))
    }
    return set(edge_ids) <= synced_edges and len(policy_holders(nodes)) >= workers
