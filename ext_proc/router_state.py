"""What ext_proc currently knows: the routing table and fleet health, swapped as one.

A request takes `LiveState.current` once when its stream starts and decides on
that snapshot, so a policy or health update never shows a request half of each.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ext_proc.clients import NO_CLIENTS, ClientTable, build_client_table, spent_by_client
from ext_proc.health_view import EMPTY_HEALTH, CandidateHealth, HealthView, build_health_view
from ext_proc.routing_table import RoutingTable, build_routing_table
from gpu_router.api.v1 import clients_pb2, health_pb2, routing_pb2


@dataclass(frozen=True, slots=True, kw_only=True)
class RouterState:
    table: RoutingTable | None = None
    """None until the control plane sends a RoutingPolicy."""
    health: HealthView = EMPTY_HEALTH
    aligned: Mapping[str, CandidateHealth] = field(default_factory=lambda: MappingProxyType({}))
    """Canonical model -> health aligned with the table's candidates for it."""
    clients: ClientTable = NO_CLIENTS
    """Who may use the edge (the policy's clients, by key hash)."""
    spent: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """Client name -> USD spent in its budget window, as the control plane last pushed it."""

    @classmethod
    def of(cls, table: RoutingTable | None, health: HealthView, clients: ClientTable = NO_CLIENTS,
           spent: Mapping[str, float] | None = None) -> RouterState:
        aligned = health.align_table(table) if table is not None else MappingProxyType({})
        return cls(table=table, health=health, aligned=aligned, clients=clients,
                   spent=spent if spent is not None else MappingProxyType({}))


class LiveState:
    """The state every new stream reads; replaced whole by the xDS client."""

    def __init__(self) -> None:
        self.current = RouterState()
        self.routable = asyncio.Event()
        """Set once a routing policy and the fleet's CRL are held (the health check reports
        SERVING from then on): a replica never serves before it can refuse a revoked edge."""
        self._awaited = {"policy", "crl"}

    def apply_policy(self, policy: routing_pb2.RoutingPolicy) -> None:
        """Build the routing table (RoutingTableError leaves the old one in place)."""
        table = build_routing_table(policy)
        clients = build_client_table(policy.clients, table)
        current = self.current
        self.current = RouterState.of(table, current.health, clients, current.spent)
        self._holds("policy")

    def crl_applied(self) -> None:
        """The control plane's CRL (an empty one: it has none) is applied."""
        self._holds("crl")

    def _holds(self, what: str) -> None:
        self._awaited.discard(what)
        if not self._awaited:
            self.routable.set()

    def apply_health(self, snapshot: health_pb2.HealthSnapshot) -> None:
        current = self.current
        self.current = RouterState.of(current.table, build_health_view(snapshot), current.clients,
                                      current.spent)

    def apply_spend(self, snapshot: clients_pb2.ClientSpendSnapshot) -> None:
        self.current = dataclasses.replace(self.current, spent=spent_by_client(snapshot))
