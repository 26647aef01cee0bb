"""The policy domain: what a policy file says, after validation.

Everything here is immutable, so a loaded config can be shared by the translator,
the xDS snapshot and the HTTP admin surface without copies or locks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Strategy(enum.Enum):
    COST = "cost"
    LATENCY = "latency"
    BALANCED = "balanced"


@dataclass(frozen=True, slots=True, kw_only=True)
class Gpu:
    type: str
    """GPU type as the provider sells it, e.g. "H100", "L40S"."""
    memory_gb: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Price:
    """USD per 1M tokens."""

    input: float
    output: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Offering:
    """One model as one provider serves it."""

    model: str
    """Public model name (Model.name)."""
    provider_model_id: str
    """The provider's own id, written into the request body sent to it."""
    gpu: str
    """GPU type (one of Provider.gpus) this offering runs on."""
    price: Price


@dataclass(frozen=True, slots=True, kw_only=True)
class Credential:
    """Where a provider's API key comes from; the key itself never sits in the policy."""

    env: str | None = None
    file: str | None = None
    header: str = "authorization"
    prefix: str = "Bearer "


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """A provider's base URL, split into what Envoy needs."""

    scheme: str
    """"http" or "https" (https means TLS with SNI = host)."""
    host: str
    port: int
    path_prefix: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Provider:
    name: str
    base_url: str
    upstream: Upstream
    gpus: tuple[Gpu, ...]
    offerings: tuple[Offering, ...]
    max_concurrency: int = 64
    health_check_path: str = "/health"
    credential: Credential | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Model:
    name: str
    aliases: tuple[str, ...] = ()
    min_gpu_memory_gb: float = 0.0
    gpu_types: tuple[str, ...] = ()
    """When non-empty, only these GPU types fit (in addition to the memory floor)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    path_prefix: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    """(lower-case header name, exact value) pairs; all must match."""
    models: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    name: str
    match: Match = field(default_factory=Match)
    strategy: Strategy = Strategy.BALANCED
    cost_weight: float = 0.5
    latency_weight: float = 0.5
    latency_sla_ms: float = 0.0
    """Cost-first: skip providers measured slower than this (0 = no SLA)."""
    cost_ceiling_usd_per_mtok: float = 0.0
    """Latency-first: skip providers pricier than this for the request (0 = no ceiling)."""
    max_fallbacks: int = 2
    providers: tuple[str, ...] = ()
    """Allow-list of provider names this policy may route to (empty = every provider)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingConfig:
    """A whole validated policy file."""

    providers: tuple[Provider, ...]
    models: tuple[Model, ...]
    policies: tuple[Policy, ...]
    """In match order; the first whose match fits a request wins."""
    source: str = "<embedded default>"
    version: str = ""
    """Content hash of the source text."""
