"""RoutingConfig -> the RoutingPolicy resource that ext_proc replicas receive over xDS.

Only what a routing decision needs crosses the wire: no base URLs, no credentials.
Each provider's Envoy cluster is named exactly the provider name.
"""

from __future__ import annotations

from control_plane.policy.model import (
    Client,
    Model,
    Offering,
    Policy,
    Provider,
    RoutingConfig,
    Strategy,
)
from gpu_router.api.v1 import clients_pb2, routing_pb2

_STRATEGIES = {
    Strategy.COST: routing_pb2.COST,
    Strategy.LATENCY: routing_pb2.LATENCY,
    Strategy.BALANCED: routing_pb2.BALANCED,
}


def to_routing_policy(config: RoutingConfig) -> routing_pb2.RoutingPolicy:
    return routing_pb2.RoutingPolicy(
        version=config.version,
        providers=[_provider(provider) for provider in config.providers],
        models=[_model(model) for model in config.models],
        policies=[_policy(policy) for policy in config.policies],
        clients=[_client(client) for client in config.clients],
    )


def _provider(provider: Provider) -> routing_pb2.Provider:
    return routing_pb2.Provider(
        name=provider.name,
        cluster=provider.name,
        gpus=[routing_pb2.Gpu(type=gpu.type, memory_gb=gpu.memory_gb) for gpu in provider.gpus],
        offerings=[_offering(offering) for offering in provider.offerings],
        max_concurrency=provider.max_concurrency,
    )


def _offering(offering: Offering) -> routing_pb2.Offering:
    """Unlisted optional prices stay unset (HasField false), never 0."""
    price = offering.price
    optional = {
        "cached_input_usd_per_mtok": price.cached_input,
        "cache_write_usd_per_mtok": price.cache_write,
        "reasoning_usd_per_mtok": price.reasoning,
    }
    return routing_pb2.Offering(
        model=offering.model,
        provider_model_id=offering.provider_model_id,
        gpu=offering.gpu,
        input_usd_per_mtok=price.input,
        output_usd_per_mtok=price.output,
        **{name: value for name, value in optional.items() if value is not None},
    )


def _model(model: Model) -> routing_pb2.Model:
    return routing_pb2.Model(
        name=model.name,
        aliases=model.aliases,
        min_gpu_memory_gb=model.min_gpu_memory_gb,
        gpu_types=model.gpu_types,
    )


def _policy(policy: Policy) -> routing_pb2.Policy:
    return routing_pb2.Policy(
        name=policy.name,
        match=routing_pb2.Match(
            path_prefix=policy.match.path_prefix,
            headers=dict(policy.match.headers),
            models=policy.match.models,
        ),
        strategy=_STRATEGIES[policy.strategy],
        cost_weight=policy.cost_weight,
        latency_weight=policy.latency_weight,
        latency_sla_ms=policy.latency_sla_ms,
        cost_ceiling_usd_per_mtok=policy.cost_ceiling_usd_per_mtok,
        max_fallbacks=policy.max_fallbacks,
        providers=policy.providers,
    )


def _client(client: Client) -> clients_pb2.Client:
    """Only the key's hash travels; an unset budget stays unset (HasField false), never 0."""
    budget = {} if client.budget is None else {
        "budget_usd": client.budget.usd, "budget_window_s": client.budget.window_s}
    return clients_pb2.Client(
        name=client.name,
        key_sha256=client.key_sha256,
        requests_per_minute=client.limits.requests_per_minute,
        tokens_per_minute=client.limits.tokens_per_minute,
        models=client.models,
        policy=client.policy or "",
        **budget,
    )
