"""The routing view of a RoutingPolicy, built once per policy version.

Everything a request needs to look up (model names and aliases, each model's
candidate offerings as numpy arrays, hardware fit, the policies in match order)
is resolved here, so the request path only indexes into immutable structures.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from gpu_router.api.v1 import routing_pb2

STRATEGIES = ("cost", "latency", "balanced")
"""Strategy names as clients give them in x-gpu-router-strategy."""

_STRATEGY_NAMES = {
    routing_pb2.STRATEGY_UNSPECIFIED: "balanced",
    routing_pb2.COST: "cost",
    routing_pb2.LATENCY: "latency",
    routing_pb2.BALANCED: "balanced",
}


class RoutingTableError(ValueError):
    """A RoutingPolicy that cannot be routed with (ext_proc NACKs it)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRoute:
    """One public model and every offering of it, aligned index by index."""

    name: str
    providers: tuple[str, ...]
    """Provider of each candidate, in policy provider order (the tie-break order)."""
    clusters: tuple[str, ...]
    provider_model_ids: tuple[str, ...]
    provider_index: npt.NDArray[np.int64]
    """Index of each candidate's provider in RoutingTable.providers."""
    input_usd_per_mtok: npt.NDArray[np.float64]
    output_usd_per_mtok: npt.NDArray[np.float64]
    unfit: tuple[str | None, ...]
    """Why the candidate's GPU cannot hold the model, or None when it fits."""
    fits: npt.NDArray[np.bool_]
    prices: tuple[tuple[float, float], ...] = field(init=False)
    """(input, output) USD per 1M tokens per candidate as Python floats: decide() ranks a few
    candidates in plain Python, where numpy's per-call overhead would dominate."""
    fit_flags: tuple[bool, ...] = field(init=False)
    tie_break: tuple[int, ...] = field(init=False)
    """provider_index as Python ints."""
    summary_formats: tuple[str, ...] = field(init=False)
    """"<provider>=%.6g" per candidate (a "%" of the name doubled): the candidate summary's entry
    of each scored candidate, joined in rank order into one format for every score at once."""
    ties_in_index_order: bool = field(init=False)
    """tie_break rises with the index (as build_routing_table makes it): a stable sort on the
    score alone then breaks ties as decide() must."""

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # frozen: derived once here, at table build time
        set_field(self, "prices", tuple(zip(self.input_usd_per_mtok.tolist(),
                                            self.output_usd_per_mtok.tolist(), strict=True)))
        set_field(self, "fit_flags", tuple(self.fits.tolist()))
        set_field(self, "tie_break", tuple(self.provider_index.tolist()))
        set_field(self, "summary_formats", tuple(
            p.replace("%", "%%") + "=%.6g" for p in self.providers))
        set_field(self, "ties_in_index_order", all(
            a < b for a, b in zip(self.tie_break, self.tie_break[1:])))


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyRule:
    """One policy: when it applies and how it scores."""

    name: str
    strategy: str
    """"cost", "latency" or "balanced"."""
    cost_weight: float
    latency_weight: float
    latency_sla_ms: float
    """0 = no SLA."""
    cost_ceiling_usd_per_mtok: float
    """0 = no ceiling."""
    max_fallbacks: int
    path_prefix: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    models: frozenset[str] = frozenset()
    """Canonical model names; empty matches every model."""
    providers: frozenset[str] = frozenset()
    """The policy's provider allow-list; empty allows every provider."""

    def match(self, path: str, headers: Mapping[str, str], model: str | None) -> bool:
        """True when every condition of the policy's match holds for the request."""
        if self.path_prefix and not path.startswith(self.path_prefix):
            return False
        if self.models and model not in self.models:
            return False
        return all(headers.get(name) == value for name, value in self.headers)


DEFAULT_POLICY = PolicyRule(
    name="default",
    strategy="balanced",
    cost_weight=0.5,
    latency_weight=0.5,
    latency_sla_ms=0.0,
    cost_ceiling_usd_per_mtok=0.0,
    max_fallbacks=2,
)
"""Applies when no policy of the file matches, so a request is never left without one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingTable:
    version: str
    providers: tuple[str, ...]
    models: Mapping[str, ModelRoute]
    """Canonical model name -> route."""
    names: Mapping[str, str]
    """Public name or alias -> canonical model name."""
    policies: tuple[PolicyRule, ...]
    models_list_body: bytes
    """The OpenAI /v1/models answer, serialised once."""

    def resolve(self, name: str) -> ModelRoute | None:
        canonical = self.names.get(name)
        return None if canonical is None else self.models[canonical]

    def match(self, path: str, headers: Mapping[str, str], model: str | None) -> PolicyRule:
        """The first policy whose match fits, else DEFAULT_POLICY."""
        for policy in self.policies:
            if policy.match(path, headers, model):
                return policy
        return DEFAULT_POLICY


def _unfit_reason(gpu: routing_pb2.Gpu, model: routing_pb2.Model) -> str | None:
    if gpu.memory_gb < model.min_gpu_memory_gb:
        return (
            f"gpu {gpu.type} ({gpu.memory_gb:g} GB) too small for {model.name} "
            f"(needs {model.min_gpu_memory_gb:g} GB)"
        )
    if model.gpu_types and gpu.type not in model.gpu_types:
        return f"gpu {gpu.type} not among {model.name}'s gpu types ({', '.join(model.gpu_types)})"
    return None


def _policy_rule(policy: routing_pb2.Policy, names: Mapping[str, str]) -> PolicyRule:
    unknown = [m for m in policy.match.models if m not in names]
    if unknown:
        raise RoutingTableError(f"policy {policy.name!r} matches unknown models {unknown}")
    strategy = _STRATEGY_NAMES.get(policy.strategy)
    if strategy is None:
        raise RoutingTableError(f"policy {policy.name!r} has unknown strategy {policy.strategy}")
    return PolicyRule(
        name=policy.name,
        strategy=strategy,
        cost_weight=policy.cost_weight,
        latency_weight=policy.latency_weight,
        latency_sla_ms=policy.latency_sla_ms,
        cost_ceiling_usd_per_mtok=policy.cost_ceiling_usd_per_mtok,
        max_fallbacks=policy.max_fallbacks,
        path_prefix=policy.match.path_prefix,
        headers=tuple(sorted((k.lower(), v) for k, v in policy.match.headers.items())),
        models=frozenset(names[m] for m in policy.match.models),
        providers=frozenset(policy.providers),
    )


def _names(models: list[routing_pb2.Model]) -> dict[str, str]:
    names: dict[str, str] = {}
    for model in models:
        for name in (model.name, *model.aliases):
            if not name:
                raise RoutingTableError("a model has an empty name or alias")
            if names.setdefault(name, model.name) != model.name:
                raise RoutingTableError(
                    f"model name {name!r} names both {names[name]!r} and {model.name!r}"
                )
    return names


def build_routing_table(policy: routing_pb2.RoutingPolicy) -> RoutingTable:
    """Resolve a RoutingPolicy into lookup structures; RoutingTableError when it is inconsistent."""
    names = _names(list(policy.models))
    models = {m.name: m for m in policy.models}
    provider_names = tuple(p.name for p in policy.providers)
    if len(set(provider_names)) != len(provider_names):
        raise RoutingTableError(f"duplicate provider names in {provider_names}")
    offers: dict[str, list[tuple[int, routing_pb2.Provider, routing_pb2.Offering, str | None]]] = {
        name: [] for name in models
    }
    for index, provider in enumerate(policy.providers):
        if not provider.cluster:
            raise RoutingTableError(f"provider {provider.name!r} has no cluster")
        gpus = {gpu.type: gpu for gpu in provider.gpus}
        for offering in provider.offerings:
            if offering.model not in models:
                raise RoutingTableError(
                    f"provider {provider.name!r} offers unknown model {offering.model!r}"
                )
            if offering.gpu not in gpus:
                raise RoutingTableError(
                    f"provider {provider.name!r} offers {offering.model!r} "
                    f"on unknown gpu {offering.gpu!r}"
                )
            reason = _unfit_reason(gpus[offering.gpu], models[offering.model])
            offers[offering.model].append((index, provider, offering, reason))
    routes = {
        name: ModelRoute(
            name=name,
            providers=tuple(p.name for _, p, _, _ in rows),
            clusters=tuple(p.cluster for _, p, _, _ in rows),
            provider_model_ids=tuple(o.provider_model_id or name for _, _, o, _ in rows),
            provider_index=np.array([i for i, _, _, _ in rows], dtype=np.int64),
            input_usd_per_mtok=np.array(
                [o.input_usd_per_mtok for _, _, o, _ in rows], dtype=np.float64
            ),
            output_usd_per_mtok=np.array(
                [o.output_usd_per_mtok for _, _, o, _ in rows], dtype=np.float64
            ),
            unfit=tuple(r for _, _, _, r in rows),
            fits=np.array([r is None for _, _, _, r in rows], dtype=np.bool_),
        )
        for name, rows in offers.items()
    }
    models_list = {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "gpu-router"}
            for name in models
        ],
    }
    return RoutingTable(
        version=policy.version,
        providers=provider_names,
        models=MappingProxyType(routes),
        names=MappingProxyType(names),
        policies=tuple(_policy_rule(p, names) for p in policy.policies),
        models_list_body=json.dumps(models_list, separators=(",", ":")).encode(),
    )
