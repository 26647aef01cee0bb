"""The routes a request takes when ext_proc did not answer: the policy's rules, kept by Envoy.

When ext_proc is down, frozen or slow, Envoy goes on without its answer (failure_mode_allow) and
no route header is set. These routes enforce what Envoy can check by itself:

- only the inference paths a policy routes, and the policy's own path prefix and headers;
- only models the policy knows: the model string the edge's request-fields filter read from the
  JSON body (it clears the route cache once it has), or the x-gpu-router-model header when the
  body named none, matched against the model's name and aliases;
- only providers the policy allows whose GPU fits the model, ordered by the policy's strategy
  (cost: cheapest list price first; latency and balanced: the fleet's weights, highest first;
  a latency policy's cost ceiling puts pricier providers last), leaving out providers the fleet
  weighted 0, at most max_fallbacks + 1 of them.

Each is named "fallback/<policy>/<model>": the access log carries the route name, so the control
plane books the request under that model and its price. GET /v1/models is answered from the
policy; anything else gets Envoy's own OpenAI-style 404.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc_pb2
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2, value_pb2

from control_plane.policy.model import Model, Policy, Provider, RoutingConfig, Strategy
from control_plane.translate.failover_route import failover_route
from control_plane.translate.names import (
    FALLBACK_ROUTE_PREFIX,
    INFERENCE_PATHS,
    MODEL_HEADER,
    MODELS_PATH,
    REQUEST_METADATA_NAMESPACE,
)
from control_plane.translate.settings import EdgeSettings

FALLBACK_REASON = "fallback: ext_proc unavailable"


def fallback_route_name(policy: str, model: str) -> str:
    return f"{FALLBACK_ROUTE_PREFIX}{policy}/{model}"


def fallback_route_names(config: RoutingConfig) -> dict[str, tuple[str, str]]:
    """Route name -> (policy, model) for every fallback route `config` may have (names may hold
    "/", so they are looked up, not split)."""
    return {
        fallback_route_name(policy.name, model.name): (policy.name, model.name)
        for policy in config.policies
        for model in config.models
    }


def fallback_routes(
    config: RoutingConfig, settings: EdgeSettings, weights: Mapping[str, int] | None
) -> list[rc_pb2.Route]:
    """Every policy's routes for every model it serves, in policy order, then the answers Envoy
    gives by itself. `weights` (provider -> fleet weight) orders providers; None: policy order."""
    routes = [
        route
        for policy in config.policies
        for model in config.models
        for route in _model_routes(config, policy, model, settings, weights)
    ]
    routes.append(_models_list(config))
    routes.append(
        _not_found(
            "fallback/unknown-model",
            _inference_paths(""),
            "the model is not served here (GET /v1/models lists those that are)",
            "model_not_found",
        )
    )
    routes.append(
        _not_found(
            "fallback/unknown-path",
            rc_pb2.RouteMatch(prefix="/"),
            f"unknown path; the router serves {', '.join(INFERENCE_PATHS)} and {MODELS_PATH}",
            "unknown_url",
        )
    )
    return routes


def usable_providers(config: RoutingConfig, policy: Policy, model: Model) -> dict[str, float]:
    """The providers `policy` allows that offer `model` on a GPU that fits it, in config order
    (the candidates ext_proc may rank), with their list price (input + output per 1M)."""
    return {
        provider.name: price
        for provider in config.providers
        if (not policy.providers or provider.name in policy.providers)
        and (price := _fitting_price(provider, model)) is not None
    }


def provider_order(
    config: RoutingConfig, policy: Policy, model: Model, weights: Mapping[str, int] | None
) -> tuple[str, ...]:
    """The providers a fallback request for `model` under `policy` tries, in order."""
    prices = usable_providers(config, policy, model)
    names = list(prices)
    if weights is not None and any(weights.get(n, 0) > 0 for n in names):
        names = [n for n in names if weights.get(n, 0) > 0]
    if policy.strategy is Strategy.COST:
        names.sort(key=lambda n: prices[n])
    elif weights is not None:
        names.sort(key=lambda n: -weights.get(n, 0))
    ceiling = policy.cost_ceiling_usd_per_mtok
    if policy.strategy is Strategy.LATENCY and ceiling > 0:
        names.sort(key=lambda n: prices[n] > ceiling)
    return tuple(names[: policy.max_fallbacks + 1])


def _fitting_price(provider: Provider, model: Model) -> float | None:
    """The provider's list price for `model` (input + output per 1M tokens) when it offers the
    model on a GPU that fits it; None otherwise."""
    gpus = {gpu.type: gpu for gpu in provider.gpus}
    for offering in provider.offerings:
        gpu = gpus.get(offering.gpu)
        if offering.model == model.name and gpu is not None and model.fits(gpu):
            return offering.price.input + offering.price.output
    return None


def _model_routes(
    config: RoutingConfig,
    policy: Policy,
    model: Model,
    settings: EdgeSettings,
    weights: Mapping[str, int] | None,
) -> Iterator[rc_pb2.Route]:
    if policy.match.models and model.name not in policy.match.models:
        return
    order = provider_order(config, policy, model, weights)
    if not order:
        return
    names = (model.name, *model.aliases)
    in_body = _request_field("model", _any_of(names))
    no_body_model = _request_field(
        "model", value_pb2.ValueMatcher(present_match=True), invert=True
    )
    header_model = rc_pb2.HeaderMatcher(
        name=MODEL_HEADER,
        string_match=string_pb2.StringMatcher(
            safe_regex=regex_pb2.RegexMatcher(regex="|".join(map(_re2_literal, names)))
        ),
    )
    name = fallback_route_name(policy.name, model.name)
    # The body's model; else, when the body named none, the model header.
    for metadata, headers in (([in_body], []), ([no_body_model], [header_model])):
        match = _inference_paths(policy.match.path_prefix)
        if match is None:
            return
        match.headers.extend([*_policy_headers(policy), *headers])
        match.dynamic_metadata.extend(metadata)
        yield failover_route(name, match, order, policy, settings, FALLBACK_REASON, len(order))


def _inference_paths(prefix: str) -> rc_pb2.RouteMatch | None:
    """A match for the inference paths under `prefix` (query strings aside); None if none is."""
    paths = [p for p in INFERENCE_PATHS if p.startswith(prefix)]
    if not paths:
        return None
    regex = "|".join(map(_re2_literal, paths))
    return rc_pb2.RouteMatch(safe_regex=regex_pb2.RegexMatcher(regex=regex))


def _policy_headers(policy: Policy) -> list[rc_pb2.HeaderMatcher]:
    return [
        rc_pb2.HeaderMatcher(name=name, string_match=string_pb2.StringMatcher(exact=value))
        for name, value in policy.match.headers
    ]


def _request_field(
    key: str, value: value_pb2.ValueMatcher, *, invert: bool = False
) -> metadata_pb2.MetadataMatcher:
    return metadata_pb2.MetadataMatcher(
        filter=REQUEST_METADATA_NAMESPACE,
        path=[metadata_pb2.MetadataMatcher.PathSegment(key=key)],
        value=value,
        invert=invert,
    )


def _any_of(texts: tuple[str, ...]) -> value_pb2.ValueMatcher:
    """Equal to one of `texts` (an or_match needs at least two)."""
    exact = [value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact=t)) for t in texts]
    if len(exact) == 1:
        return exact[0]
    return value_pb2.ValueMatcher(or_match=value_pb2.OrMatcher(value_matchers=exact))


_RE2_SPECIAL = frozenset("\\.+*?()|[]{}^$")


def _re2_literal(text: str) -> str:
    """`text` as a RE2 pattern that matches exactly it."""
    return "".join("\\" + c if c in _RE2_SPECIAL else c for c in text)


def _models_list(config: RoutingConfig) -> rc_pb2.Route:
    """GET /v1/models, as ext_proc answers it (same body), from the policy."""
    body = {
        "object": "list",
        "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "gpu-router"}
            for m in config.models
        ],
    }
    return _direct_json("fallback/models", rc_pb2.RouteMatch(path=MODELS_PATH), 200, body)


def _not_found(
    name: str, match: rc_pb2.RouteMatch | None, message: str, code: str
) -> rc_pb2.Route:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": code}}
    return _direct_json(name, match or rc_pb2.RouteMatch(prefix="/"), 404, body)


def _direct_json(name: str, match: rc_pb2.RouteMatch, status: int, body: object) -> rc_pb2.Route:
    return rc_pb2.Route(
        name=name,
        match=match,
        direct_response=rc_pb2.DirectResponseAction(
            status=status,
            body=base_pb2.DataSource(inline_string=json.dumps(body, separators=(",", ":"))),
        ),
        response_headers_to_add=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="content-type", value="application/json"),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        ],
    )
