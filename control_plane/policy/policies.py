"""The policies section (match, strategy, weights, allowed providers), and the checks that span
sections: a catch-all policy last, and every model fitting some provider's GPU."""

from __future__ import annotations

from typing import Any

from control_plane.policy.checker import HEADER_NAME, MISSING, URL_PATH, Checker
from control_plane.policy.issues import KeyPath
from control_plane.policy.model import Match, Model, Policy, Provider, Strategy
from control_plane.policy.names import Names, known_model

_MAX_FALLBACKS = 5
_STRATEGIES = ", ".join(strategy.value for strategy in Strategy)


def read_policy(check: Checker, raw: Any, path: KeyPath, names: Names) -> Policy | None:
    fields = check.mapping(
        raw, path, required=("name",),
        optional=("match", "strategy", "weights", "latency_sla_ms", "cost_ceiling_usd_per_mtok",
                  "max_fallbacks", "per_try_timeout_ms", "providers"),
    )
    if fields is None:
        return None
    name = check.string(fields.get("name", MISSING), (*path, "name"))
    if name is not None:
        check.unique(names.policies, name, (*path, "name"), "policy name")
    match = _match(check, fields.get("match", {}), (*path, "match"), names)
    strategy = _strategy(check, fields.get("strategy", Strategy.BALANCED.value),
                         (*path, "strategy"))
    weights = _weights(check, fields, path, strategy)
    latency_sla_ms = check.number(fields.get("latency_sla_ms", 0), (*path, "latency_sla_ms"))
    cost_ceiling = check.number(fields.get("cost_ceiling_usd_per_mtok", 0),
                                (*path, "cost_ceiling_usd_per_mtok"))
    per_try_timeout_ms = check.integer(fields.get("per_try_timeout_ms", 60000),
                                       (*path, "per_try_timeout_ms"), minimum=1)
    max_fallbacks = check.integer(fields.get("max_fallbacks", 2), (*path, "max_fallbacks"),
                                  minimum=0, maximum=_MAX_FALLBACKS)
    allowed: dict[str, KeyPath] = {}
    providers = check.items(
        fields.get("providers", []), (*path, "providers"),
        lambda item, item_path: _allowed_provider(check, item, item_path, names, allowed),
    )
    if (name is None or match is None or strategy is None or weights is None
            or latency_sla_ms is None or cost_ceiling is None or max_fallbacks is None
            or per_try_timeout_ms is None or providers is None):
        return None
    return Policy(name=name, match=match, strategy=strategy, cost_weight=weights[0],
                  latency_weight=weights[1], latency_sla_ms=latency_sla_ms,
                  cost_ceiling_usd_per_mtok=cost_ceiling, max_fallbacks=max_fallbacks,
                  per_try_timeout_ms=per_try_timeout_ms, providers=tuple(providers))


def _strategy(check: Checker, raw: Any, path: KeyPath) -> Strategy | None:
    text = check.string(raw, path)
    if text is None:
        return None
    try:
        return Strategy(text)
    except ValueError:
        check.fail(path, f"unknown strategy '{text}'; one of: {_STRATEGIES}")
        return None


def _weights(check: Checker, policy: dict[str, Any], path: KeyPath,
             strategy: Strategy | None) -> tuple[float, float] | None:
    """(cost, latency) weights; only a balanced policy may set them."""
    if "weights" not in policy:
        return (0.5, 0.5)
    path = (*path, "weights")
    if strategy is not None and strategy is not Strategy.BALANCED:
        check.fail(path, f"weights apply only to strategy 'balanced', not '{strategy.value}'")
    fields = check.mapping(policy["weights"], path, required=("cost", "latency"))
    if fields is None:
        return None
    cost = check.number(fields.get("cost", MISSING), (*path, "cost"))
    latency = check.number(fields.get("latency", MISSING), (*path, "latency"))
    if cost is None or latency is None:
        return None
    if cost == 0 and latency == 0:
        check.fail(path, "cost and latency weights must not both be 0")
        return None
    return (cost, latency)


def _match(check: Checker, raw: Any, path: KeyPath, names: Names) -> Match | None:
    fields = check.mapping(raw, path, optional=("path_prefix", "headers", "models"))
    if fields is None:
        return None
    path_prefix = check.string(fields.get("path_prefix", ""), (*path, "path_prefix"),
                               pattern=URL_PATH, pattern_hint="a path starting with '/'",
                               allow_empty=True)
    headers = _match_headers(check, fields.get("headers", {}), (*path, "headers"))
    seen: dict[str, KeyPath] = {}

    def read_model(item: Any, item_path: KeyPath) -> str | None:
        model = known_model(check, check.string(item, item_path), item_path, names)
        if model is not None:
            check.unique(seen, model, item_path, "model")
        return model

    models = check.items(fields.get("models", []), (*path, "models"), read_model)
    if path_prefix is None or headers is None or models is None:
        return None
    return Match(path_prefix=path_prefix, headers=headers, models=tuple(models))


def _match_headers(check: Checker, raw: Any, path: KeyPath) -> tuple[tuple[str, str], ...] | None:
    fields: dict[str, Any] | None = check.typed(raw, path, dict, "a mapping")
    if fields is None:
        return None
    headers: list[tuple[str, str]] = []
    seen: dict[str, KeyPath] = {}
    valid = True
    for name, raw_value in fields.items():
        lower = name.lower()
        value = check.string(raw_value, (*path, name))
        if not HEADER_NAME.fullmatch(lower):
            check.fail((*path, name), f"{name!r} is not an HTTP header name")
            valid = False
        else:
            check.unique(seen, lower, (*path, name), "header name")
        if value is None:
            valid = False
        else:
            headers.append((lower, value))
    return tuple(headers) if valid else None


def _allowed_provider(check: Checker, raw: Any, path: KeyPath, names: Names,
                      seen: dict[str, KeyPath]) -> str | None:
    name = check.string(raw, path)
    if name is None:
        return None
    if name not in names.providers:
        check.fail(path, f"policy names unknown provider '{name}'; known providers: "
                         f"{', '.join(names.providers)}")
        return None
    check.unique(seen, name, path, "provider")
    return name


def _matches_everything(match: Match) -> bool:
    return match.path_prefix in ("", "/") and not match.headers and not match.models


def check_catch_all(check: Checker, policies: list[Policy]) -> None:
    """The last policy must match every request, and nothing may follow a catch-all."""
    catch_all = next((i for i, policy in enumerate(policies)
                      if _matches_everything(policy.match)), None)
    if catch_all is None:
        check.fail(("policies",), "no catch-all policy: the last policy must match every "
                                  "request (no match, or an empty one)")
        return
    for index in range(catch_all + 1, len(policies)):
        check.fail(("policies", index, "name"),
                   f"policy '{policies[index].name}' is unreachable: policy "
                   f"'{policies[catch_all].name}' before it matches every request")


def check_hardware_fit(check: Checker, models: list[Model], providers: list[Provider],
                        names: Names) -> None:
    """Every gpu_types entry exists somewhere, and every model fits some offering's GPU."""
    known_types = {gpu.type for provider in providers for gpu in provider.gpus}
    for index, model in enumerate(models):
        for type_index, gpu_type in enumerate(model.gpu_types):
            if gpu_type not in known_types:
                check.fail(("models", index, "gpu_types", type_index),
                           f"unknown gpu '{gpu_type}'; provider gpus: "
                           f"{', '.join(sorted(known_types))}")
        offered_on = [gpu for provider in providers for offering in provider.offerings
                      if offering.model == model.name
                      for gpu in provider.gpus if gpu.type == offering.gpu]
        if not any(model.fits(gpu) for gpu in offered_on):
            needs = f">= {model.min_gpu_memory_gb:g} GB" + (
                f" on one of {', '.join(model.gpu_types)}" if model.gpu_types else "")
            check.fail(names.models[model.name],
                       f"no provider offers model '{model.name}' on a GPU that fits it "
                       f"(needs {needs})")
