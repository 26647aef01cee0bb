"""One ext_proc stream (= one HTTP request): one request_headers message, one answer.

Envoy's request-fields filter (an edge Lua filter) reads the JSON body before ext_proc runs and forwards
what routing needs (model, max_tokens, ...) in the message's metadata_context under
REQUEST_NAMESPACE, so the body never travels to ext_proc and one round trip decides.
The answer names the policy, the model and the length of the ranked order (winner, then
fallbacks) in ROUTE_HEADER, and the order itself in the decision's dynamic metadata
(ORDER_KEY); the control plane's route for that header value reads the order from there, and
its retry policy walks the providers in that order within the same client request. Envoy's
upstream filters, not ext_proc, rewrite the path and the body's model per attempt.
A RequestPhases answers one request-headers message; any other message, or a second one, is a
ProtocolError (the service reads one message a stream, service.py). Pure: no I/O, so it tests
with hand-built ProcessingRequest protos. The edge sends only the headers read here, the client
key's (admission.py) and those a policy matches on (control_plane/translate/listeners.py
ext_proc_headers): a header read here must be added there.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import time
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from types import MappingProxyType
from typing import TYPE_CHECKING
from urllib.parse import quote

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from ext_proc.router_state import RouterState
from ext_proc.routing_table import STRATEGIES, RoutingTable
from ext_proc.scoring import (
    NOBODY_AT_CAP,
    Decision,
    NoCandidateError,
    content_length,
    decide,
    default_max_tokens,
    estimate_prompt_tokens,
)

if TYPE_CHECKING:
    from ext_proc.clients import ClientRule

ROUTE_HEADER = "x-gpu-router-route"
"""Set to "<policy>/<model>/<attempts>" (names percent-encoded): the exact value a generated
route matches."""
ORDER_KEY = "priority_groups"
"""The decision metadata's key Envoy's priority_group cluster specifier reads the order from:
[{"name": winner}, {"name": fallback}, ...], its groups being named after the providers."""
MODEL_HEADER = "x-gpu-router-model"
STRATEGY_HEADER = "x-gpu-router-strategy"
REASON_HEADER = "x-gpu-router-reason"
METADATA_NAMESPACE = "gpu_router"
"""Where the decision goes (dynamic metadata Envoy logs and its upstream filters read)."""
REQUEST_NAMESPACE = "gpu_router.request"
"""Where the edge's request-fields filter puts the body's fields: model, max_tokens,
max_completion_tokens, stream. It answers a body it cannot read one way only (or of another
content type than JSON) itself, so such a request never gets here."""

ROUTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
MODELS_PATH = "/v1/models"

_NO_FIELDS: Mapping[str, struct_pb2.Value] = MappingProxyType({})
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_MAX_REASON_HEADER = 200


class NotReadyError(Exception):
    """No routing policy yet (a replica just started): the stream fails, so Envoy fails open
    onto its fallback route instead of the client getting an error."""


class ProtocolError(Exception):
    """Envoy sent a message the stream's phase does not expect."""


class Phase(enum.Enum):
    HEADERS = "headers"
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


def _bad_request(
    message: str, code: str, param: str | None = None
) -> ext_proc_pb2.ProcessingResponse:
    return error_response(400, message, kind="invalid_request_error", code=code, param=param)


def _missing_model() -> ext_proc_pb2.ProcessingResponse:
    """Built per refusal, not shared: the service tags each answer with its client in place."""
    return _bad_request(
        f'missing "model": give it in the JSON body or in {MODEL_HEADER}', "missing_model", "model"
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


def _not_utf8(name: str) -> ext_proc_pb2.ProcessingResponse:
    return _bad_request(f"the {name} header is not valid UTF-8", "invalid_header", name)


def _conflicting_models(header: str, body: str) -> ext_proc_pb2.ProcessingResponse:
    return _bad_request(
        f"{MODEL_HEADER} names {header!r} but the body's \"model\" is {body!r}: "
        "send one model, or the same one in both",
        "model_conflict",
        "model",
    )


MAX_OUTPUT_TOKENS = 10**12
"""Larger asks are read as this: an estimate, not a number any provider serves."""


def requested_max_tokens(fields: Mapping[str, struct_pb2.Value], default: int) -> int:
    """The output tokens a request asks for, from the edge's request-fields metadata:
    max_completion_tokens (newer OpenAI name) when it is a number >= 0, else max_tokens when
    it is, else `default`. Routing's cost estimate and the client's token rate limit both read
    it here, so they cannot disagree."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = fields.get(name)
        if value is not None and value.WhichOneof("kind") == "number_value":
            number = value.number_value
            if 0 <= number < math.inf:
                return int(min(number, MAX_OUTPUT_TOKENS))
    return default


@functools.lru_cache(maxsize=4096)
def _route_to(policy: str, model: str, attempts: int) -> ext_proc_pb2.CommonResponse:
    """Set the route header and re-pick the route (built once per value, then copied)."""
    value = f"{quote(policy, safe='')}/{quote(model, safe='')}/{attempts}"
    return ext_proc_pb2.CommonResponse(
        clear_route_cache=True,
        header_mutation=ext_proc_pb2.HeaderMutation(set_headers=[_header(ROUTE_HEADER, value)]),
    )


@functools.lru_cache(maxsize=4096)
def _decision_fields(
    provider: str, fallbacks: tuple[str, ...], model: str, policy: str, strategy: str
) -> struct_pb2.Struct:
    """The metadata fields that repeat across requests, built once and copied into each answer."""
    fields = struct_pb2.Struct()
    fields.update(
        {
            "provider": provider,
            "model": model,
            "policy": policy,
            "strategy": strategy,
            "fallbacks": ",".join(fallbacks),
            ORDER_KEY: [{"name": name} for name in (provider, *fallbacks)],
        }
    )
    return fields


class RequestPhases:
    """The state of one request's ext_proc stream."""

    def __init__(self, state: RouterState, clock: Callable[[], float] = time.time,
                 full: AbstractSet[str] = NOBODY_AT_CAP) -> None:
        """`full`: the providers the request's edge has at their max_concurrency (tried after
        others: scoring.decide)."""
        self._state = state
        self._clock = clock
        self._full = full
        self.phase = Phase.HEADERS
        self.decision: Decision | None = None
        """The routing decision, once made (for whoever audits the stream)."""
        self.client: ClientRule | None = None
        """The client the admission gate let in (ext_proc/admission.py); None: no clients."""

    def handle(self, request: ext_proc_pb2.ProcessingRequest) -> ext_proc_pb2.ProcessingResponse:
        kind = request.WhichOneof("request")
        if self.phase is Phase.HEADERS and kind == "request_headers":
            self.phase = Phase.DONE
            return self._answer(request.request_headers, request.metadata_context)
        raise ProtocolError(f"unexpected {kind} in the {self.phase.value} phase")

    def _answer(
        self, message: ext_proc_pb2.HttpHeaders, metadata: base_pb2.Metadata
    ) -> ext_proc_pb2.ProcessingResponse:
        table = self._state.table
        if table is None:
            raise NotReadyError("no routing policy from the control plane yet")
        # Any byte may arrive in a header: every value is read leniently (nothing copied into a
        # proto3 string may hold invalid UTF-8), and the ones routing reads must be exact.
        headers = {h.key: h.raw_value.decode("utf-8", "replace") for h in message.headers.headers}
        for name in (MODEL_HEADER, STRATEGY_HEADER):
            if "\ufffd" in headers.get(name, ""):
                return _not_utf8(name)
        full_path = headers.get(":path", "")
        path = full_path.partition("?")[0]
        if path == MODELS_PATH and headers.get(":method") == "GET":
            return models_response(table)
        if path not in ROUTED_PATHS:
            return error_response(
                404, f"unknown path {path}", kind="invalid_request_error", code="unknown_url"
            )
        strategy = headers.get(STRATEGY_HEADER)
        if strategy is not None:
            strategy = strategy.strip().lower()
            if strategy not in STRATEGIES:
                return _bad_request(
                    f"invalid {STRATEGY_HEADER} {headers[STRATEGY_HEADER]!r}: "
                    f"expected one of {', '.join(STRATEGIES)}",
                    "invalid_strategy",
                )
        body = metadata.filter_metadata.get(REQUEST_NAMESPACE)
        fields = _NO_FIELDS if body is None else body.fields
        found = fields.get("model")
        body_model = None if found is None else found.string_value
        model = headers.get(MODEL_HEADER) or body_model
        if not model:
            return _missing_model()
        route = table.resolve(model)
        if route is None:
            return _unknown_model(model)
        if body_model is not None and body_model != model:
            # The provider reads the body: it must name the model the request is routed by.
            other = table.resolve(body_model)
            if other is None or other.name != route.name:
                return _conflicting_models(model, body_model)
        length = content_length(headers.get("content-length", ""))
        forced = None if self.client is None else self.client.for_model(route.name)
        if isinstance(forced, ext_proc_pb2.ProcessingResponse):
            return forced  # the client's model allow-list leaves this model out: 403
        policy = forced or table.match(path, headers, route.name)
        try:
            decision = self.decision = decide(
                route,
                self._state.aligned[route.name],
                policy,
                strategy=strategy or policy.strategy,
                prompt_tokens=estimate_prompt_tokens(length),
                max_tokens=requested_max_tokens(fields, default_max_tokens(path)),
                now_unix_ms=int(self._clock() * 1000),
                full=self._full,
            )
        except NoCandidateError as error:
            return error_response(503, error.reason, kind="server_error", code="no_provider")
        return _routed(decision, full_path)


def _routed(decision: Decision, path: str) -> ext_proc_pb2.ProcessingResponse:
    """Route along the decision's order and record the decision as dynamic metadata."""
    response = ext_proc_pb2.ProcessingResponse()
    response.request_headers.response.CopyFrom(
        _route_to(decision.policy, decision.model, 1 + len(decision.fallbacks))
    )
    audit = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value
    audit.CopyFrom(
        _decision_fields(
            decision.provider,
            decision.fallbacks,
            decision.model,
            decision.policy,
            decision.strategy,
        )
    )
    fields = audit.fields
    fields["reason"].string_value = decision.reason
    fields["candidates"].string_value = decision.candidate_summary
    fields["path"].string_value = path
    return response
