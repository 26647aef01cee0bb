"""RequestPhases: one request_headers message (body fields in metadata_context), one answer."""

from __future__ import annotations

import json
from urllib.parse import unquote

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from ext_proc_fixtures import body_request, default_policy, headers_request, health_entry, snapshot
from google.protobuf import json_format

from ext_proc.health_view import build_health_view
from ext_proc.request import NotReadyError, Phase, ProtocolError, RequestPhases
from ext_proc.router_state import RouterState
from ext_proc.routing_table import build_routing_table
from ext_proc.scoring import content_length
from gpu_router.api.v1 import health_pb2

NOW_MS = 1_700_000_000_000
STATE = RouterState.of(build_routing_table(default_policy()), build_health_view(snapshot()))


def set_headers(mutation: ext_proc_pb2.HeaderMutation) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def error_of(response: ext_proc_pb2.ProcessingResponse) -> tuple[int, dict]:
    assert response.WhichOneof("response") == "immediate_response"
    immediate = response.immediate_response
    headers = set_headers(immediate.headers)
    assert headers["content-type"] == "application/json"
    return immediate.status.code, json.loads(immediate.body)


def routed(response: ext_proc_pb2.ProcessingResponse) -> tuple[str, dict[str, str]]:
    """("policy/winner,fallbacks,...", the gpu_router metadata but the order) of an answer that
    routes: the route header names the policy, the model and the order's length (each
    percent-encoded), the metadata the order
    (what the route's priority_group specifier walks), and the two must agree."""
    assert response.WhichOneof("response") == "request_headers"
    common = response.request_headers.response
    assert common.clear_route_cache
    headers = set_headers(common.header_mutation)
    assert list(headers) == ["x-gpu-router-route"]  # no :path, no content-length: Envoy's job
    assert not common.HasField("body_mutation") and not response.HasField("mode_override")
    metadata = json_format.MessageToDict(response.dynamic_metadata)
    assert list(metadata) == ["gpu_router"]
    decision = metadata["gpu_router"]
    order = [group["name"] for group in decision.pop("priority_groups")]
    assert order == [decision["provider"], *filter(None, decision["fallbacks"].split(","))]
    policy, model, attempts = map(unquote, headers["x-gpu-router-route"].split("/"))
    assert (policy, model, int(attempts)) == (decision["policy"], decision["model"], len(order))
    return f"{policy}/{','.join(order)}", decision


def test_the_body_model_from_metadata_is_decided_in_one_answer() -> None:
    phases = RequestPhases(STATE)
    response = phases.handle(
        headers_request(
            "/v1/chat/completions?api-version=1",
            x_request_id="req-1",
            content_type="application/json",
            content_length="400",
            body_fields={"model": "llama3-8b", "max_tokens": 10, "stream": True},
        )
    )
    assert routed(response) == (
        "interactive/lambda,coreweave,vast",
        {
            "provider": "lambda",
            "model": "llama-3.1-8b",
            "policy": "interactive",
            "strategy": "latency",
            "reason": "unmeasured: exploring",
            "fallbacks": "coreweave,vast",
            "candidates": "lambda=0;coreweave=0;vast=0;runpod=0",
            "path": "/v1/chat/completions?api-version=1",
        },
    )
    assert phases.phase is Phase.DONE
    assert phases.decision is not None and phases.decision.provider == "lambda"


@pytest.mark.parametrize(
    ("entries", "route", "reason"),
    [
        ((), "interactive/lambda,coreweave,vast", "unmeasured: exploring"),
        (
            (health_entry("lambda", state=health_pb2.EJECTED, cooldown_until_unix_ms=NOW_MS + 1),),
            "interactive/coreweave,vast,runpod",
            "unmeasured: exploring; lambda ejected",
        ),
        (
            (
                health_entry("lambda", state=health_pb2.EJECTED, cooldown_until_unix_ms=NOW_MS + 1),
                health_entry("vast", "llama-3.1-8b", state=health_pb2.EJECTED),
                health_entry("runpod", state=health_pb2.EJECTED, cooldown_until_unix_ms=NOW_MS),
            ),
            # runpod's Retry-After has run out; lambda, ejected, is the last resort
            "interactive/coreweave,runpod,lambda",
            "unmeasured: exploring; lambda, vast ejected",
        ),
    ],
)
def test_the_route_header_orders_winner_then_fallbacks_with_ejected_providers_last(
    entries: tuple[health_pb2.ProviderHealth, ...], route: str, reason: str
) -> None:
    state = RouterState.of(STATE.table, build_health_view(snapshot(*entries)))
    response = RequestPhases(state, clock=lambda: NOW_MS / 1000).handle(
        headers_request(body_fields={"model": "llama-3.1-8b"})
    )
    header, metadata = routed(response)
    assert header == route
    policy, _, order = header.partition("/")
    assert (policy, order) == (
        metadata["policy"],
        ",".join([metadata["provider"], *filter(None, metadata["fallbacks"].split(","))]),
    )
    assert metadata["reason"] == reason


def test_the_model_header_alone_routes() -> None:
    response = RequestPhases(STATE).handle(headers_request(x_gpu_router_model="mixtral"))
    assert routed(response)[1]["model"] == "mixtral-8x7b"


def test_the_strategy_header_overrides_the_policy() -> None:
    response = RequestPhases(STATE).handle(
        headers_request(x_gpu_router_strategy=" COST", body_fields={"model": "llama-3.1-8b"})
    )
    route, metadata = routed(response)
    assert (route, metadata["strategy"]) == ("interactive/vast,runpod,lambda", "cost")


def test_requests_sharing_a_decision_keep_their_own_fields() -> None:
    """The per-decision metadata is built once and copied: nothing leaks between requests."""
    first, second = (
        routed(
            RequestPhases(STATE).handle(
                headers_request(f"/v1/embeddings?n={n}", x_request_id=f"r{n}", body_fields=fields)
            )
        )[1]
        for n, fields in ((1, {"model": "bge-large"}), (2, {"model": "bge-large", "x": 1}))
    )
    assert first == {**second, "path": "/v1/embeddings?n=1"}
    assert second["path"] == "/v1/embeddings?n=2"
    # The request id is Envoy's own (x-request-id, in every log entry): it does not ride here.
    assert "request_id" not in first


def test_content_length_and_max_completion_tokens_drive_the_expected_cost() -> None:
    phases = RequestPhases(STATE)
    phases.handle(
        headers_request(
            x_gpu_router_strategy="cost",
            content_length="52",
            body_fields={
                "model": "llama-3.1-8b",
                "max_tokens": 5,
                "max_completion_tokens": 1_000_000,
            },
        )
    )
    assert phases.decision is not None
    vast = next(c for c in phases.decision.candidates if c.provider == "vast")
    assert vast.expected_cost_usd == pytest.approx((13 * 0.05 + 1_000_000 * 0.08) / 1e6)


@pytest.mark.parametrize(("value", "length"), [
    ("52", 52), (b"52", 52), ("-52", 0), ("+52", 0), (" 52", 0), ("5_2", 0), ("\u00b2", 0),
    (b"-52", 0), ("", 0),
])
def test_content_length_is_plain_ascii_digits_or_nothing(value: str | bytes, length: int) -> None:
    """One reading for routing (str headers) and the token limit (raw bytes): int() alone took
    "-52" as a negative prompt and so a negative expected cost."""
    assert content_length(value) == length


def test_a_signed_content_length_prices_no_prompt() -> None:
    phases = RequestPhases(STATE)
    phases.handle(headers_request(x_gpu_router_strategy="cost", content_length="-4000",
                                  body_fields={"model": "llama-3.1-8b", "max_tokens": 1}))
    assert phases.decision is not None
    vast = next(c for c in phases.decision.candidates if c.provider == "vast")
    assert vast.expected_cost_usd == pytest.approx(1 * 0.08 / 1e6)


@pytest.mark.parametrize(
    ("path", "fields", "output_tokens"),
    [
        ("/v1/chat/completions", {"max_tokens": 7}, 7),
        ("/v1/chat/completions", {"max_tokens": -1}, 256),
        ("/v1/chat/completions", {"max_completion_tokens": "x"}, 256),
        ("/v1/chat/completions", {"max_completion_tokens": -2, "max_tokens": 9}, 9),
        ("/v1/chat/completions", {}, 256),
        ("/v1/embeddings", {}, 0),
    ],
)
def test_output_tokens_from_the_metadata_else_the_path_default(
    path: str, fields: dict, output_tokens: int
) -> None:
    phases = RequestPhases(STATE)
    phases.handle(
        headers_request(
            path, x_gpu_router_strategy="cost", body_fields={"model": "llama-3.1-8b", **fields}
        )
    )
    assert phases.decision is not None
    vast = next(c for c in phases.decision.candidates if c.provider == "vast")
    assert vast.expected_cost_usd == pytest.approx(output_tokens * 0.08 / 1e6)


def test_the_original_path_goes_to_envoys_per_attempt_rewrite_untouched() -> None:
    request = headers_request(
        "/v1/chat/completions?api-version=2", body_fields={"model": "llama-3.1-8b"}
    )
    route, metadata = routed(RequestPhases(STATE).handle(request))  # asserts no :path mutation
    assert route.startswith("interactive/lambda,")
    assert metadata["path"] == "/v1/chat/completions?api-version=2"


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
            headers_request(x_gpu_router_strategy="fast", body_fields={"model": "mixtral"}),
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
            headers_request(body_fields={"model": "gpt-4"}),
            404,
            "model_not_found",
            "model 'gpt-4' does not exist",
        ),
        (
            headers_request(end_of_stream=True),
            400,
            "missing_model",
            'missing "model": give it in the JSON body or in x-gpu-router-model',
        ),
        (
            headers_request(body_fields={"max_tokens": 3}),
            400,
            "missing_model",
            'missing "model": give it in the JSON body or in x-gpu-router-model',
        ),
        (
            headers_request(x_gpu_router_model="mixtral", body_fields={"model": "llama3-8b"}),
            400,
            "model_conflict",
            "x-gpu-router-model names 'mixtral' but the body's \"model\" is 'llama3-8b'",
        ),
        (
            headers_request(x_gpu_router_model="mixtral", body_fields={"model": "gpt-expensive"}),
            400,
            "model_conflict",
            "x-gpu-router-model names 'mixtral' but the body's \"model\" is 'gpt-expensive'",
        ),
    ],
)
def test_errors(
    request_: ext_proc_pb2.ProcessingRequest, status: int, code: str, message: str
) -> None:
    phases = RequestPhases(STATE)
    got_status, body = error_of(phases.handle(request_))
    assert (got_status, body["error"]["code"]) == (status, code)
    assert body["error"]["message"].startswith(message)
    assert body["error"]["type"] == "invalid_request_error"
    assert phases.phase is Phase.DONE


def test_tagging_one_refusal_with_its_client_leaves_the_next_untouched() -> None:
    """The service tags answers in place (admission.tag_client): no answer may be shared."""
    first = RequestPhases(STATE).handle(headers_request(end_of_stream=True))
    first.dynamic_metadata.fields["gpu_router"].struct_value.fields["client"].string_value = "a"
    second = RequestPhases(STATE).handle(headers_request(end_of_stream=True))
    assert error_of(second)[0] == 400
    assert not second.HasField("dynamic_metadata")


def test_a_header_and_a_body_naming_one_model_by_two_names_route() -> None:
    response = RequestPhases(STATE).handle(
        headers_request(x_gpu_router_model="llama3-8b", body_fields={"model": "llama-3.1-8b"})
    )
    assert routed(response)[1]["model"] == "llama-3.1-8b"


def with_raw(request: ext_proc_pb2.ProcessingRequest, name: str, raw: bytes):
    """`request` with header `name` set to bytes that need not be UTF-8."""
    headers = request.request_headers.headers.headers
    found = [h for h in headers if h.key == name]
    (header,) = found or [headers.add(key=name)]
    header.raw_value = raw
    return request


@pytest.mark.parametrize("name", ["user-agent", "x-request-id", ":path", "x-workload", "accept"])
def test_a_header_of_any_bytes_routes_and_the_answer_stays_valid_protobuf(name: str) -> None:
    request = headers_request(body_fields={"model": "mixtral"})
    raw = b"/v1/chat/completions?\xff\xfe\x00" if name == ":path" else b"\xff\xc0\xa2 x"
    response = RequestPhases(STATE).handle(with_raw(request, name, raw))
    wire = ext_proc_pb2.ProcessingResponse.FromString(response.SerializeToString())
    route, _ = routed(wire)
    assert route.startswith("interactive/")


@pytest.mark.parametrize("name", ["x-gpu-router-model", "x-gpu-router-strategy"])
def test_a_routing_header_that_is_not_utf8_is_a_400(name: str) -> None:
    request = with_raw(headers_request(body_fields={"model": "mixtral"}), name, b"mixtral\xff")
    status, body = error_of(RequestPhases(STATE).handle(request))
    assert (status, body["error"]["code"], body["error"]["param"]) == (400, "invalid_header", name)
    assert body["error"]["message"] == f"the {name} header is not valid UTF-8"


def test_every_fitting_provider_ejected_still_routes_through_them_all() -> None:
    """No certain 503 while an ejected provider may already have recovered (panic mode)."""
    ejected = snapshot(
        health_entry("lambda", state=health_pb2.EJECTED),
        health_entry("runpod", state=health_pb2.EJECTED),
    )
    state = RouterState.of(STATE.table, build_health_view(ejected))
    response = RequestPhases(state).handle(headers_request(body_fields={"model": "mixtral"}))
    route, decision = routed(response)
    assert route.endswith(("/runpod,lambda", "/lambda,runpod")), route
    assert decision["reason"].endswith("every fitting provider ejected: tried anyway")


def test_not_ready_before_any_policy() -> None:
    with pytest.raises(NotReadyError, match="no routing policy from the control plane yet"):
        RequestPhases(RouterState()).handle(headers_request())


def test_any_message_but_the_first_request_headers_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="unexpected request_body in the headers phase"):
        RequestPhases(STATE).handle(body_request(b"{}"))
    with pytest.raises(ProtocolError, match="unexpected response_headers in the headers phase"):
        RequestPhases(STATE).handle(
            ext_proc_pb2.ProcessingRequest(response_headers=ext_proc_pb2.HttpHeaders())
        )
    phases = RequestPhases(STATE)
    phases.handle(headers_request(body_fields={"model": "mixtral"}))
    with pytest.raises(ProtocolError, match="unexpected request_body in the done phase"):
        phases.handle(body_request(b"{}"))
    with pytest.raises(ProtocolError, match="unexpected request_headers in the done phase"):
        phases.handle(headers_request(body_fields={"model": "mixtral"}))
