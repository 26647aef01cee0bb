"""RequestPhases: each (phase, message) transition, from hand-made ProcessingRequest protos."""

from __future__ import annotations

import json

import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from ext_proc_fixtures import body_request, default_policy, headers_request, health_entry, snapshot
from google.protobuf import json_format

from ext_proc.health_view import build_health_view
from ext_proc.request import Phase, ProtocolError, RequestPhases
from ext_proc.router_state import RouterState
from ext_proc.routing_table import build_routing_table
from gpu_router.api.v1 import health_pb2

STATE = RouterState.of(build_routing_table(default_policy()), build_health_view(snapshot()))


def _vast_serves_bge_as_bge_large() -> RouterState:
    policy = default_policy()
    policy.providers[2].offerings[2].provider_model_id = "bge-large"
    return RouterState.of(build_routing_table(policy), build_health_view(snapshot()))


SAME_ID = _vast_serves_bge_as_bge_large()
"""vast (the cheapest for bge-large) calls it by its public name."""


def set_headers(mutation: ext_proc_pb2.HeaderMutation) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def error_of(response: ext_proc_pb2.ProcessingResponse) -> tuple[int, dict]:
    assert response.WhichOneof("response") == "immediate_response"
    immediate = response.immediate_response
    headers = set_headers(immediate.headers)
    assert headers["content-type"] == "application/json"
    return immediate.status.code, json.loads(immediate.body)


def to_body(
    phases: RequestPhases, path: str = "/v1/chat/completions", **headers: str
) -> RequestPhases:
    response = phases.handle(headers_request(path, x_request_id="req-1", **headers))
    assert response.WhichOneof("response") == "request_headers"
    assert not response.request_headers.response.HasField("header_mutation")
    assert phases.phase is Phase.BODY
    return phases


def test_body_model_is_decided_and_rewritten_with_content_length() -> None:
    phases = to_body(RequestPhases(STATE))
    body = json.dumps(
        {"model": "llama3-8b", "messages": [{"role": "user", "content": "hé"}], "max_tokens": 10}
    )
    response = phases.handle(body_request(body.encode()))
    common = response.request_body.response
    assert common.clear_route_cache
    new_body = common.body_mutation.body
    assert json.loads(new_body) == {**json.loads(body), "model": "meta-llama/Llama-3.1-8B-Instruct"}
    assert set_headers(common.header_mutation) == {
        "x-gpu-router-cluster": "lambda",
        "content-length": str(len(new_body)),
    }
    assert json_format.MessageToDict(response.dynamic_metadata) == {
        "gpu_router": {
            "provider": "lambda",
            "model": "llama-3.1-8b",
            "policy": "interactive",
            "strategy": "latency",
            "reason": "unmeasured: exploring",
            "fallbacks": "coreweave,vast",
            "request_id": "req-1",
        }
    }
    assert phases.phase is Phase.DONE
    assert phases.decision is not None and phases.decision.provider == "lambda"


def test_strategy_header_overrides_the_policy() -> None:
    phases = to_body(RequestPhases(STATE), x_gpu_router_strategy=" COST")
    response = phases.handle(body_request(b'{"model": "llama-3.1-8b"}'))
    metadata = json_format.MessageToDict(response.dynamic_metadata)["gpu_router"]
    assert (metadata["provider"], metadata["strategy"], metadata["policy"]) == (
        "vast",
        "cost",
        "interactive",
    )
    assert json.loads(response.request_body.response.body_mutation.body) == {"model": "llama3.1:8b"}


def test_body_already_naming_the_provider_id_is_not_rewritten() -> None:
    phases = to_body(RequestPhases(SAME_ID), "/v1/embeddings")
    response = phases.handle(body_request(b'{"model": "bge-large", "input": "x"}'))
    common = response.request_body.response
    assert not common.HasField("body_mutation")
    assert set_headers(common.header_mutation) == {"x-gpu-router-cluster": "vast"}


def test_header_model_equal_to_the_provider_id_skips_the_body() -> None:
    phases = RequestPhases(STATE)
    response = phases.handle(
        headers_request(
            x_gpu_router_model="llama3.1:8b", x_gpu_router_strategy="cost", content_length="400"
        )
    )
    assert response.WhichOneof("response") == "immediate_response"  # llama3.1:8b is no public name
    response = RequestPhases(STATE).handle(
        headers_request(
            "/v1/embeddings", x_gpu_router_model="BAAI/bge-large-en-v1.5", content_length="400"
        )
    )
    assert error_of(response)[0] == 404
    phases = RequestPhases(SAME_ID)
    response = phases.handle(
        headers_request("/v1/embeddings", x_gpu_router_model="bge-large", content_length="400")
    )
    common = response.request_headers.response
    assert set_headers(common.header_mutation) == {"x-gpu-router-cluster": "vast"}
    assert common.clear_route_cache
    assert response.mode_override.request_body_mode == processing_mode_pb2.ProcessingMode.NONE
    assert phases.phase is Phase.DONE
    with pytest.raises(ProtocolError, match="unexpected request_body in the done phase"):
        phases.handle(body_request(b"{}"))


def test_header_model_needing_a_rewrite_waits_for_the_body() -> None:
    phases = to_body(RequestPhases(STATE), x_gpu_router_model="mixtral", content_length="100")
    response = phases.handle(body_request(b'{"model":"whatever","messages":[]}'))
    assert (
        json.loads(response.request_body.response.body_mutation.body)["model"]
        == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    )


def test_header_model_without_a_body_routes_at_once() -> None:
    response = RequestPhases(STATE).handle(
        headers_request(x_gpu_router_model="mixtral", end_of_stream=True)
    )
    assert set_headers(response.request_headers.response.header_mutation) == {
        "x-gpu-router-cluster": "lambda"
    }
    assert not response.HasField("mode_override")


def test_models_list_answers_directly() -> None:
    response = RequestPhases(STATE).handle(
        headers_request("/v1/models?x=1", "GET", end_of_stream=True)
    )
    assert response.immediate_response.status.code == 200
    assert len(json.loads(response.immediate_response.body)["data"]) == 4


@pytest.mark.parametrize(
    ("request_", "status", "code", "message"),
    [
        (headers_request("/v1/images"), 404, "unknown_url", "unknown path /v1/images"),
        (
            headers_request(x_gpu_router_strategy="fast"),
            400,
            "invalid_strategy",
            "invalid x-gpu-router-strategy 'fast': expected one of cost, latency, balanced",
        ),
        (
            headers_request(x_gpu_router_model="gpt-4"),
            404,
            "model_not_found",
            "model 'gpt-4' does not exist",
        ),
        (
            headers_request(end_of_stream=True),
            400,
            "missing_model",
            "no request body: give the model in the JSON body or in x-gpu-router-model",
        ),
    ],
)
def test_header_errors(
    request_: ext_proc_pb2.ProcessingRequest, status: int, code: str, message: str
) -> None:
    phases = RequestPhases(STATE)
    got_status, body = error_of(phases.handle(request_))
    assert (got_status, body["error"]["code"], body["error"]["message"]) == (status, code, message)
    assert phases.phase is Phase.DONE


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        (
            b'{"model": ',
            400,
            "invalid_json",
            "invalid JSON body: Expecting value: line 1 column 11 (char 10)",
        ),
        (b"\xff\xfe", 400, "invalid_json", "invalid JSON body:"),
        (b'["model"]', 400, "invalid_json", "the request body must be a JSON object"),
        (b'{"messages": []}', 400, "missing_model", 'missing "model" in the request body'),
        (b'{"model": 7}', 400, "missing_model", 'missing "model" in the request body'),
        (b'{"model": "gpt-4"}', 404, "model_not_found", "model 'gpt-4' does not exist"),
    ],
)
def test_body_errors(body: bytes, status: int, code: str, message: str) -> None:
    got_status, error = error_of(to_body(RequestPhases(STATE)).handle(body_request(body)))
    assert (got_status, error["error"]["code"]) == (status, code)
    assert error["error"]["message"].startswith(message)
    assert error["error"]["type"] == "invalid_request_error"


def test_no_candidate_is_503_with_the_reason_in_body_and_header() -> None:
    ejected = snapshot(
        health_entry("lambda", state=health_pb2.EJECTED),
        health_entry("runpod", state=health_pb2.EJECTED),
    )
    state = RouterState.of(STATE.table, build_health_view(ejected))
    response = to_body(RequestPhases(state)).handle(body_request(b'{"model": "mixtral"}'))
    status, body = error_of(response)
    assert (status, body["error"]["code"]) == (503, "no_provider")
    assert body["error"]["message"].startswith(
        "no provider can serve mixtral-8x7b (lambda: ejected"
    )
    reason = set_headers(response.immediate_response.headers)["x-gpu-router-reason"]
    assert reason.startswith("no provider can serve mixtral-8x7b") and reason.isascii()


def test_not_ready_before_any_policy() -> None:
    status, body = error_of(RequestPhases(RouterState()).handle(headers_request()))
    assert (status, body["error"]["message"]) == (
        503,
        "router not ready: no routing policy from the control plane yet",
    )


def test_messages_out_of_phase_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="unexpected request_body in the headers phase"):
        RequestPhases(STATE).handle(body_request(b"{}"))
    with pytest.raises(ProtocolError, match="unexpected request_headers in the body phase"):
        to_body(RequestPhases(STATE)).handle(headers_request())
    with pytest.raises(ProtocolError, match="partial request body"):
        to_body(RequestPhases(STATE)).handle(body_request(b"{", end_of_stream=False))
    with pytest.raises(ProtocolError, match="unexpected response_headers"):
        RequestPhases(STATE).handle(
            ext_proc_pb2.ProcessingRequest(response_headers=ext_proc_pb2.HttpHeaders())
        )


def test_max_completion_tokens_drives_the_expected_cost() -> None:
    phases = to_body(RequestPhases(STATE), x_gpu_router_strategy="cost")
    phases.handle(body_request(b'{"model":"llama-3.1-8b","max_completion_tokens":1000000}'))
    assert phases.decision is not None
    vast = next(c for c in phases.decision.candidates if c.provider == "vast")
    assert vast.expected_cost_usd == pytest.approx((13 * 0.05 + 1_000_000 * 0.08) / 1e6)


def test_a_base_url_path_is_put_in_front_of_the_request_path() -> None:
    policy = default_policy()
    policy.providers[0].path_prefix = "/inference/"
    state = RouterState.of(build_routing_table(policy), build_health_view(snapshot()))
    phases = to_body(RequestPhases(state))

    response = phases.handle(body_request(b'{"model": "llama-3.1-8b", "messages": []}'))

    headers = set_headers(response.request_body.response.header_mutation)
    assert headers["x-gpu-router-cluster"] == "lambda"
    assert headers[":path"] == "/inference/v1/chat/completions"
