"""One ext_proc stream (= one HTTP request) as an explicit phase machine.

Envoy sends the request headers, then (BUFFERED body mode) the whole body in one
message unless a headers answer overrode the body mode to NONE. Each
(phase, message) pair below has a handler; any other pair is a ProtocolError.
Pure: no I/O, so it tests with hand-built ProcessingRequest protos.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from envoy.type.v3 import http_status_pb2

from ext_proc.router_state import RouterState
from ext_proc.routing_table import STRATEGIES, RoutingTable
from ext_proc.scoring import (
    DEFAULT_MAX_TOKENS,
    Decision,
    NoCandidateError,
    decide,
    estimate_prompt_tokens,
)

ROUTING_HEADER = "x-gpu-router-cluster"
MODEL_HEADER = "x-gpu-router-model"
STRATEGY_HEADER = "x-gpu-router-strategy"
REASON_HEADER = "x-gpu-router-reason"
METADATA_NAMESPACE = "gpu_router"

ROUTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
MODELS_PATH = "/v1/models"
_NO_OUTPUT_PATHS = frozenset({"/v1/embeddings"})

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_SKIP_BODY = processing_mode_pb2.ProcessingMode(
    request_body_mode=processing_mode_pb2.ProcessingMode.NONE
)
_MAX_REASON_HEADER = 200


class ProtocolError(Exception):
    """Envoy sent a message the stream's phase does not expect."""


class Phase(enum.Enum):
    HEADERS = "headers"
    BODY = "body"
    DONE = "done"


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE
    )


def _header_safe(text: str) -> str:
    """A header value Envoy accepts: printable ASCII, bounded length."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:_MAX_REASON_HEADER])


def error_response(
    status: int, message: str, *, kind: str, code: str, param: str | None = None
) -> ext_proc_pb2.ProcessingResponse:
    """An OpenAI-style JSON error Envoy answers the client with, the upstream never seeing it."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return ext_proc_pb2.ProcessingResponse(
        immediate_response=ext_proc_pb2.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=ext_proc_pb2.HeaderMutation(
                set_headers=[
                    _header("content-type", "application/json"),
                    _header(REASON_HEADER, _header_safe(message)),
                ]
            ),
            body=json.dumps(body, separators=(",", ":")).encode(),
            details=f"gpu_router_{code}",
        )
    )


NOT_READY = error_response(
    503,
    "router not ready: no routing policy from the control plane yet",
    kind="server_error",
    code="router_not_ready",
)


def models_response(table: RoutingTable) -> ext_proc_pb2.ProcessingResponse:
    return ext_proc_pb2.ProcessingResponse(
        immediate_response=ext_proc_pb2.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=200),
            headers=ext_proc_pb2.HeaderMutation(
                set_headers=[_header("content-type", "application/json")]
            ),
            body=table.models_list_body,
        )
    )


def _unknown_model(name: str) -> ext_proc_pb2.ProcessingResponse:
    return error_response(
        404,
        f"model {name!r} does not exist",
        kind="invalid_request_error",
        code="model_not_found",
        param="model",
    )


def _no_candidate(error: NoCandidateError) -> ext_proc_pb2.ProcessingResponse:
    return error_response(503, error.reason, kind="server_error", code="no_provider")


def _bad_request(
    message: str, code: str, param: str | None = None
) -> ext_proc_pb2.ProcessingResponse:
    return error_response(400, message, kind="invalid_request_error", code=code, param=param)


def _max_tokens(body: dict[str, object], default: int) -> int:
    """max_completion_tokens (newer OpenAI name) or max_tokens; else the default."""
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return default


class RequestPhases:
    """The state of one request across its ext_proc messages."""

    def __init__(self, state: RouterState, clock: Callable[[], float] = time.time) -> None:
        self._state = state
        self._clock = clock
        self.phase = Phase.HEADERS
        self.decision: Decision | None = None
        """The routing decision, once made (for whoever audits the stream)."""
        self._headers: dict[str, str] = {}
        self._path = ""
        self._strategy = ""
        self._header_model = ""

    def handle(self, request: ext_proc_pb2.ProcessingRequest) -> ext_proc_pb2.ProcessingResponse:
        kind = request.WhichOneof("request")
        if self.phase is Phase.HEADERS and kind == "request_headers":
            return self.on_request_headers(request.request_headers)
        if self.phase is Phase.BODY and kind == "request_body":
            return self.on_request_body(request.request_body)
        raise ProtocolError(f"unexpected {kind} in the {self.phase.value} phase")

    def _finish(self, response: ext_proc_pb2.ProcessingResponse) -> ext_proc_pb2.ProcessingResponse:
        self.phase = Phase.DONE
        return response

    def on_request_headers(
        self, message: ext_proc_pb2.HttpHeaders
    ) -> ext_proc_pb2.ProcessingResponse:
        table = self._state.table
        if table is None:
            return self._finish(NOT_READY)
        headers = self._headers = {
            h.key: h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
            for h in message.headers.headers
        }
        path = self._path = headers.get(":path", "").partition("?")[0]
        if path == MODELS_PATH and headers.get(":method") == "GET":
            return self._finish(models_response(table))
        if path not in ROUTED_PATHS:
            return self._finish(
                error_response(
                    404, f"unknown path {path}", kind="invalid_request_error", code="unknown_url"
                )
            )
        strategy = headers.get(STRATEGY_HEADER)
        if strategy is not None and strategy.strip().lower() not in STRATEGIES:
            return self._finish(
                _bad_request(
                    f"invalid {STRATEGY_HEADER} {strategy!r}: "
                    f"expected one of {', '.join(STRATEGIES)}",
                    "invalid_strategy",
                )
            )
        self._strategy = strategy.strip().lower() if strategy else ""
        self._header_model = headers.get(MODEL_HEADER, "")
        if self._header_model:
            try:
                length = int(headers.get("content-length") or 0)
            except ValueError:
                length = 0
            outcome = self._decide(self._header_model, estimate_prompt_tokens(length), None)
            if not isinstance(outcome, Decision):
                return self._finish(outcome)
            # Otherwise the body must be rewritten: decided again on it, whose size and
            # max_tokens estimate the cost better than content-length alone.
            if message.end_of_stream or outcome.provider_model_id == self._header_model:
                response = self._routed(outcome, None)
                if not message.end_of_stream:
                    response.mode_override.CopyFrom(_SKIP_BODY)
                return self._finish(response)
        elif message.end_of_stream:
            return self._finish(
                _bad_request(
                    f"no request body: give the model in the JSON body or in {MODEL_HEADER}",
                    "missing_model",
                    "model",
                )
            )
        self.phase = Phase.BODY
        return ext_proc_pb2.ProcessingResponse(request_headers=ext_proc_pb2.HeadersResponse())

    def on_request_body(self, message: ext_proc_pb2.HttpBody) -> ext_proc_pb2.ProcessingResponse:
        if not message.end_of_stream:
            raise ProtocolError(
                "got a partial request body: the filter must buffer it (request_body_mode BUFFERED)"
            )
        try:
            body = json.loads(message.body)
        except (ValueError, UnicodeDecodeError) as error:
            return self._finish(_bad_request(f"invalid JSON body: {error}", "invalid_json"))
        if not isinstance(body, dict):
            return self._finish(
                _bad_request("the request body must be a JSON object", "invalid_json")
            )
        model = self._header_model or body.get("model")
        if not isinstance(model, str) or not model:
            return self._finish(
                _bad_request('missing "model" in the request body', "missing_model", "model")
            )
        outcome = self._decide(model, estimate_prompt_tokens(len(message.body)), body)
        if not isinstance(outcome, Decision):
            return self._finish(outcome)
        new_body = None
        if body.get("model") != outcome.provider_model_id:
            body["model"] = outcome.provider_model_id
            new_body = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        return self._finish(self._routed(outcome, new_body))

    def _decide(
        self, model: str, prompt_tokens: int, body: dict[str, object] | None
    ) -> Decision | ext_proc_pb2.ProcessingResponse:
        """The decision, or the error response that ends the request."""
        table = self._state.table
        assert table is not None, "headers phase answers NOT_READY before any decision"
        route = table.resolve(model)
        if route is None:
            return _unknown_model(model)
        policy = table.match(self._path, self._headers, route.name)
        default_max = 0 if self._path in _NO_OUTPUT_PATHS else DEFAULT_MAX_TOKENS
        try:
            self.decision = decide(
                route,
                self._state.aligned[route.name],
                policy,
                strategy=self._strategy or policy.strategy,
                prompt_tokens=prompt_tokens,
                max_tokens=default_max if body is None else _max_tokens(body, default_max),
                now_unix_ms=int(self._clock() * 1000),
            )
        except NoCandidateError as error:
            return _no_candidate(error)
        return self.decision

    def _routed(
        self, decision: Decision, new_body: bytes | None
    ) -> ext_proc_pb2.ProcessingResponse:
        """Route to the decision's cluster; with a rewritten body when the model id changed."""
        response = ext_proc_pb2.ProcessingResponse()
        common = (
            response.request_headers if self.phase is Phase.HEADERS else response.request_body
        ).response
        common.clear_route_cache = True
        common.header_mutation.set_headers.append(_header(ROUTING_HEADER, decision.cluster))
        if decision.path_prefix:
            path = decision.path_prefix + self._headers.get(":path", "")
            common.header_mutation.set_headers.append(_header(":path", path))
        if new_body is not None:
            common.body_mutation.body = new_body
            common.header_mutation.set_headers.append(_header("content-length", str(len(new_body))))
        response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.update(
            {
                "provider": decision.provider,
                "model": decision.model,
                "policy": decision.policy,
                "strategy": decision.strategy,
                "reason": decision.reason,
                "fallbacks": ",".join(decision.fallbacks),
                "request_id": self._headers.get("x-request-id", ""),
            }
        )
        return response
