"""An immutable view of the fleet's HealthSnapshot, aligned with a routing table.

Built once per (snapshot, routing table) pair, so a request reads ready numpy
arrays: per candidate, the measured latency, the health state and until when an
ejected provider cools down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from ext_proc.routing_table import ModelRoute, RoutingTable
from gpu_router.api.v1 import health_pb2

HEALTHY = health_pb2.HEALTHY
DEGRADED = health_pb2.DEGRADED
EJECTED = health_pb2.EJECTED

_SEVERITY: dict[int, int] = {
    health_pb2.HEALTH_STATE_UNSPECIFIED: 0,
    HEALTHY: 0,
    DEGRADED: 1,
    EJECTED: 2,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class CandidateHealth:
    """Health of one model's candidates, index-aligned with its ModelRoute."""

    latency_ms: npt.NDArray[np.float64]
    """EWMA total latency; NaN when unmeasured."""
    state: npt.NDArray[np.int8]
    """HealthState value (UNSPECIFIED counts as healthy)."""
    cooldown_until_unix_ms: npt.NDArray[np.int64]
    """For EJECTED candidates: when they may be tried again (0 = until the next snapshot)."""

    def ejected(self, now_unix_ms: int) -> npt.NDArray[np.bool_]:
        cooling = (self.cooldown_until_unix_ms == 0) | (self.cooldown_until_unix_ms > now_unix_ms)
        return (self.state == EJECTED) & cooling

    @property
    def degraded(self) -> npt.NDArray[np.bool_]:
        return self.state == DEGRADED


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthView:
    entries: Mapping[tuple[str, str], health_pb2.ProviderHealth]
    """(provider, public model or "" for the provider as a whole) -> entry."""
    generated_at_unix_ms: int = 0

    def latency_ms(self, provider: str, model: str) -> float | None:
        """The model's EWMA on that provider, else the provider-wide one, else None (unmeasured)."""
        for key in ((provider, model), (provider, "")):
            entry = self.entries.get(key)
            if entry is not None and entry.samples > 0:
                return entry.ewma_latency_ms
        return None

    def state(self, provider: str, model: str) -> tuple[int, int]:
        """(state, cooldown) of the worse of the model's and the provider-wide entries."""
        worst: tuple[int, int] = (HEALTHY, 0)
        for key in ((provider, model), (provider, "")):
            entry = self.entries.get(key)
            if entry is not None and _SEVERITY.get(entry.state, 0) > _SEVERITY[worst[0]]:
                worst = (entry.state, entry.cooldown_until_unix_ms)
        return worst

    def align(self, route: ModelRoute) -> CandidateHealth:
        latency = [self.latency_ms(p, route.name) for p in route.providers]
        states = [self.state(p, route.name) for p in route.providers]
        return CandidateHealth(
            latency_ms=np.array([np.nan if v is None else v for v in latency], dtype=np.float64),
            state=np.array([s for s, _ in states], dtype=np.int8),
            cooldown_until_unix_ms=np.array([c for _, c in states], dtype=np.int64),
        )

    def align_table(self, table: RoutingTable) -> Mapping[str, CandidateHealth]:
        """Every model of the table aligned at once: done per swap, never per request."""
        return MappingProxyType({name: self.align(route) for name, route in table.models.items()})


EMPTY_HEALTH = HealthView(entries=MappingProxyType({}))
"""Before the first snapshot: every provider healthy and unmeasured."""


def build_health_view(snapshot: health_pb2.HealthSnapshot) -> HealthView:
    return HealthView(
        entries=MappingProxyType({(e.provider, e.model): e for e in snapshot.entries}),
        generated_at_unix_ms=snapshot.generated_at_unix_ms,
    )
