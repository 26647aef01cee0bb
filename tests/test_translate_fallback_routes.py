"""The fallback routes: what a request ext_proc did not answer may reach, on the default policy."""

from __future__ import annotations

import json

import pytest
from translate_fixtures import attempt_order

from control_plane.policy.load import default_policy_path, load_policy_file
from control_plane.translate.fallback_routes import (
    FALLBACK_REASON,
    fallback_route_names,
    fallback_routes,
    provider_order,
)
from control_plane.translate.settings import EdgeSettings

CONFIG = load_policy_file(default_policy_path())
SETTINGS = EdgeSettings()
POLICIES = {p.name: p for p in CONFIG.policies}
MODELS = {m.name: m for m in CONFIG.models}


def order(policy: str, model: str, weights: dict[str, int] | None = None) -> tuple[str, ...]:
    return provider_order(CONFIG, POLICIES[policy], MODELS[model], weights)


def test_cost_policies_try_the_cheapest_fitting_providers_first() -> None:
    # list prices (input + output): vast 0.13, runpod 0.20, lambda 0.50, coreweave 0.60
    assert order("batch", "llama-3.1-8b") == ("vast", "runpod", "lambda")
    # vast lists mixtral on a 24 GB RTX-4090: it does not fit, so it is never tried.
    assert order("batch", "mixtral-8x7b") == ("runpod", "lambda")


def test_latency_policies_follow_the_fleet_weights_leaving_out_weight_zero() -> None:
    weights = {"lambda": 60, "coreweave": 100, "vast": 0, "runpod": 80}
    assert order("interactive", "llama-3.1-8b", weights) == ("coreweave", "runpod", "lambda")
    assert order("interactive", "llama-3.1-8b") == ("lambda", "coreweave", "vast")
    everyone_out = dict.fromkeys(weights, 0)
    assert order("interactive", "bge-large", everyone_out) == ("coreweave", "vast")


def routes(weights: dict[str, int] | None = None) -> dict[str, list]:
    found: dict[str, list] = {}
    for route in fallback_routes(CONFIG, SETTINGS, weights):
        found.setdefault(route.name, []).append(route)
    return found


def test_each_policy_and_model_has_a_body_route_and_a_header_route_on_inference_paths() -> None:
    by_body, by_header = routes()["fallback/batch/llama-3.1-8b"]
    for route in (by_body, by_header):
        assert route.match.safe_regex.regex == (
            r"/v1/chat/completions|/v1/completions|/v1/embeddings"
        )
        assert attempt_order(route) == ["vast", "runpod", "lambda"]
        assert route.route.retry_policy.num_retries.value == 2
        reason = {h.header.key: h.header.value for h in route.response_headers_to_add}
        assert reason["x-gpu-router-reason"] == FALLBACK_REASON
    assert [(h.name, h.string_match.exact) for h in by_body.match.headers] == [
        ("x-workload", "batch")
    ]
    (model,) = by_body.match.dynamic_metadata
    assert (model.filter, [p.key for p in model.path]) == ("gpu_router.request", ["model"])
    names = [v.string_match.exact for v in model.value.or_match.value_matchers]
    assert names == ["llama-3.1-8b", "llama3-8b", "meta-llama/Llama-3.1-8B-Instruct"]
    (absent,) = by_header.match.dynamic_metadata
    assert absent.invert and absent.value.present_match
    header = by_header.match.headers[-1]
    assert header.name == "x-gpu-router-model"
    assert header.string_match.safe_regex.regex == (
        r"llama-3\.1-8b|llama3-8b|meta-llama/Llama-3\.1-8B-Instruct"
    )


def test_a_policy_path_prefix_narrows_the_paths() -> None:
    route = routes()["fallback/embeddings/bge-large"][0]
    assert route.match.safe_regex.regex == "/v1/embeddings"


def test_a_model_without_aliases_is_one_exact_match() -> None:
    """Envoy refuses an or_match of fewer than two (seen: the whole route table NACKed)."""
    (model,) = routes()["fallback/batch/bge-large"][0].match.dynamic_metadata
    assert model.value.string_match.exact == "bge-large"


def test_models_list_then_unknown_model_then_unknown_path_close_the_table() -> None:
    models, unknown_model, unknown_path = fallback_routes(CONFIG, SETTINGS, None)[-3:]
    assert models.match.path == "/v1/models"
    assert models.direct_response.status == 200
    listed = json.loads(models.direct_response.body.inline_string)
    assert [m["id"] for m in listed["data"]] == list(MODELS)
    assert unknown_model.direct_response.status == unknown_path.direct_response.status == 404
    error = json.loads(unknown_model.direct_response.body.inline_string)["error"]
    assert error["code"] == "model_not_found"
    assert unknown_path.match.prefix == "/"


@pytest.mark.parametrize("name", ["fallback/batch/llama-3.1-8b", "fallback/interactive/bge-large"])
def test_route_names_map_back_to_policy_and_model(name: str) -> None:
    policy, model = fallback_route_names(CONFIG)[name]
    assert name == f"fallback/{policy}/{model}"
    assert name in routes()
