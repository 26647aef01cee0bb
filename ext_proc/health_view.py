"""An immutable view of the fleet's HealthSnapshot, aligned with a routing table.

Built once per (snapshot, routing table) pair, so a request reads ready numpy
arrays: per candidate, the measured latency, whether it is degraded and until when
an ejected provider cools down. A candidate is ejected when its model's entry or its
provider-wide entry says so (a 429's Retry-After arrives provider-wide), for the
later of the two cooldowns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from ext_proc.ranking import balanced_latency, exploring_latencies
from ext_proc.routing_table import ModelRoute, RoutingTable
from gpu_router.api.v1 import health_pb2

DEGRADED = health_pb2.DEGRADED
EJECTED = health_pb2.EJECTED

DEGRADED_PENALTY = 2.0
"""A degraded candidate's score (cost, latency or both) counts this many times over."""
NOT_EJECTED = -1
"""ejected_until value of a candidate no entry ejects."""
UNTIL_NEXT_SNAPSHOT = 0
"""ejected_until value of an ejection without a cooldown: it lasts until a snapshot lifts it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CandidateHealth:
    """Health of one model's candidates, index-aligned with its ModelRoute."""

    latency_ms: npt.NDArray[np.float64]
    """EWMA total latency; NaN when unmeasured."""
    degraded: npt.NDArray[np.bool_]
    """The model's or the provider-wide entry is DEGRADED (it still is once an ejection ends)."""
    ejected_until_unix_ms: npt.NDArray[np.int64]
    """NOT_EJECTED, UNTIL_NEXT_SNAPSHOT, or when the candidate may be tried again."""
    latencies: tuple[float, ...] = field(init=False)
    """latency_ms as Python floats (NaN unmeasured): decide() reads these, prepared once per
    snapshot, rather than paying numpy's per-call overhead on a few candidates per request."""
    degraded_flags: tuple[bool, ...] = field(init=False)
    ejected_until: tuple[int, ...] = field(init=False)
    any_ejected: bool = field(init=False)
    """Some entry ejects a candidate (else decide() need not compare cooldowns with the time)."""
    penalties: tuple[float, ...] | None = field(init=False)
    """Each candidate's score factor, DEGRADED_PENALTY when degraded; None when none is."""
    exploring_latencies: tuple[float, ...] = field(init=False)
    """ranking.exploring_latencies(), once per snapshot: the latency strategy's score."""
    balanced_latency: tuple[tuple[float, ...], float] = field(init=False)
    """ranking.balanced_latency() with every candidate eligible, the usual case: a median and a
    minimum per snapshot rather than per request."""

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # frozen: derived once here, per health snapshot
        set_field(self, "latencies", tuple(self.latency_ms.tolist()))
        set_field(self, "degraded_flags", tuple(self.degraded.tolist()))
        set_field(self, "ejected_until", tuple(self.ejected_until_unix_ms.tolist()))
        set_field(self, "any_ejected", any(u != NOT_EJECTED for u in self.ejected_until))
        degraded = self.degraded_flags
        set_field(self, "penalties", tuple(DEGRADED_PENALTY if d else 1.0 for d in degraded)
                  if any(degraded) else None)
        set_field(self, "exploring_latencies", exploring_latencies(self.latencies))
        filled, normaliser = balanced_latency(self.latencies)
        set_field(self, "balanced_latency", (tuple(filled), normaliser))

    def ejected(self, now_unix_ms: int) -> npt.NDArray[np.bool_]:
        until = self.ejected_until_unix_ms
        return (until == UNTIL_NEXT_SNAPSHOT) | (until > now_unix_ms)


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthView:
    entries: Mapping[tuple[str, str], health_pb2.ProviderHealth]
    """(provider, public model or "" for the provider as a whole) -> entry."""
    generated_at_unix_ms: int = 0
    at_cap: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))
    """Edge -> the providers it has at their max_concurrency: its requests to them would wait
    (the others go first for that edge's requests: scoring.decide's `full`)."""

    def latency_ms(self, provider: str, model: str) -> float | None:
        """The model's EWMA on that provider, else the provider-wide one, else None (unmeasured)."""
        for key in ((provider, model), (provider, "")):
            entry = self.entries.get(key)
            if entry is not None and entry.samples > 0:
                return entry.ewma_latency_ms
        return None

    def _entries(self, provider: str, model: str) -> list[health_pb2.ProviderHealth]:
        """The model's entry and the provider-wide one, those that exist."""
        found = (self.entries.get((provider, model)), self.entries.get((provider, "")))
        return [entry for entry in found if entry is not None]

    def degraded(self, provider: str, model: str) -> bool:
        return any(entry.state == DEGRADED for entry in self._entries(provider, model))

    def ejected_until(self, provider: str, model: str) -> int:
        """NOT_EJECTED, UNTIL_NEXT_SNAPSHOT, or the later cooldown end of the ejecting entries."""
        until = NOT_EJECTED
        for entry in self._entries(provider, model):
            if entry.state != EJECTED:
                continue
            if entry.cooldown_until_unix_ms <= 0:
                return UNTIL_NEXT_SNAPSHOT
            until = max(until, entry.cooldown_until_unix_ms)
        return until

    def align(self, route: ModelRoute) -> CandidateHealth:
        latency = [self.latency_ms(p, route.name) for p in route.providers]
        return CandidateHealth(
            latency_ms=np.array([np.nan if v is None else v for v in latency], dtype=np.float64),
            degraded=np.array([self.degraded(p, route.name) for p in route.providers], np.bool_),
            ejected_until_unix_ms=np.array(
                [self.ejected_until(p, route.name) for p in route.providers], dtype=np.int64
            ),
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
        at_cap=MappingProxyType({a.edge: frozenset(a.providers) for a in snapshot.at_cap}),
    )
