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


class UsageFormat(enum.Enum):
    """How a provider reports token usage in its responses (control_plane.usage reads it)."""

    OPENAI = "openai"
    """usage {prompt_tokens, completion_tokens, prompt_tokens_details.cached_tokens,
    completion_tokens_details.reasoning_tokens}; streams: the stream_options.include_usage chunk."""
    ANTHROPIC = "anthropic"
    """usage {input_tokens, output_tokens, cache_read_input_tokens, cache_creation_input_tokens}."""
    NONE = "none"
    """No usage at all: tokens are estimated from body sizes and marked estimated."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Gpu:
    type: str
    """GPU type as the provider sells it, e.g. "H100", "L40S"."""
    memory_gb: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Price:
    """USD per 1M tokens; None = the provider does not list that price.

    Validation requires every price the provider's usage format can report (openai:
    cached_input and reasoning; anthropic: cached_input and cache_write), so a token
    count is never billed at a guessed rate.
    """

    input: float
    """Uncached input (prompt) tokens."""
    output: float
    """Output tokens other than reasoning tokens."""
    cached_input: float | None = None
    """Input tokens read from the provider's prompt cache."""
    cache_write: float | None = None
    """Input tokens written to the provider's prompt cache."""
    reasoning: float | None = None
    """Reasoning (hidden thinking) output tokens."""


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
class HealthCheck:
    """Envoy's active health check of a provider (its own machinery, configured here);
    the path is Provider.health_check_path."""

    interval_ms: int = 5000
    timeout_ms: int = 2000
    unhealthy_threshold: int = 3
    healthy_threshold: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierDetection:
    """Envoy's passive ejection of a provider; enforcement is on (Envoy's default is off for most)."""

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 3
    consecutive_local_origin_failure: int = 3
    failure_percentage_threshold: int = 50
    failure_percentage_minimum_hosts: int = 1
    failure_percentage_request_volume: int = 20
    interval_ms: int = 2000
    base_ejection_time_ms: int = 10000


@dataclass(frozen=True, slots=True, kw_only=True)
class Failover:
    """How much retrying across providers one edge may do at once."""

    max_retries_in_flight: int | None = None
    """Retries in flight on one edge for requests first sent to one provider (Envoy's max_retries
    circuit breaker of that provider's cluster); None: the sum of every provider's
    max_concurrency, the most the other providers would accept anyway."""


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
    usage_format: UsageFormat = UsageFormat.OPENAI
    health_check: HealthCheck = field(default_factory=HealthCheck)
    outlier_detection: OutlierDetection = field(default_factory=OutlierDetection)


@dataclass(frozen=True, slots=True, kw_only=True)
class Model:
    name: str
    aliases: tuple[str, ...] = ()
    min_gpu_memory_gb: float = 0.0
    gpu_types: tuple[str, ...] = ()
    """When non-empty, only these GPU types fit (in addition to the memory floor)."""

    def fits(self, gpu: Gpu) -> bool:
        """Enough memory, and a listed type if any are listed."""
        return gpu.memory_gb >= self.min_gpu_memory_gb and (
            not self.gpu_types or gpu.type in self.gpu_types
        )


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
    per_try_timeout_ms: int = 60000
    """Time an attempt may take to response headers before the next provider is tried."""
    providers: tuple[str, ...] = ()
    """Allow-list of provider names this policy may route to (empty = every provider)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingConfig:
    """A whole validated policy file."""

    providers: tuple[Provider, ...]
    models: tuple[Model, ...]
    policies: tuple[Policy, ...]
    """In match order; the first whose match fits a request wins."""
    failover: Failover = field(default_factory=Failover)
    clients: tuple[Client, ...] = ()
    """Who may use the edge; empty = an open edge (no key asked for)."""
    source: str = "<embedded default>"
    version: str = ""
    """Content hash of the source text."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """USD a client may spend in any rolling window of `window_s` seconds (the ledger's cost)."""

    usd: float
    window_s: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Per-minute limits of one client, fleet-wide; 0 = no limit."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    """Estimated tokens (prompt bytes / 4 + max_tokens) admitted per minute."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Client:
    """One holder of an edge key; the policy keeps only the key's SHA-256."""

    name: str
    key_sha256: str
    """Lower-case hex."""
    budget: Budget | None = None
    limits: Limits = field(default_factory=Limits)
    models: tuple[str, ...] = ()
    """Canonical model names allowed; empty = every model."""
    policy: str | None = None
    """The routing policy all of this client's requests use; None = matched as usual."""
