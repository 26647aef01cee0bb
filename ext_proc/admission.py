"""The client gate in front of routing: key, budget and rate limits, in that order.

When the policy declares clients, every request needs a known key (401 invalid_api_key), a
client whose budget is spent gets 429 insufficient_quota (spend pushed by the control plane
from the ledger), and one over a rate limit 429 rate_limit_exceeded with Retry-After. GET
/v1/models needs no key: it lists the policy's model names, which the edge's fallback route
serves without ext_proc anyway, and the stack's readiness check reads it. The model allow-list
and the forced policy apply once the model is known (ClientRule.for_model, from request.py).
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2

from ext_proc.clients import ClientRule, presented_key
from ext_proc.rate_limit import Charge, RateLimiter, whole_seconds
from ext_proc.request import (
    METADATA_NAMESPACE,
    MODELS_PATH,
    REQUEST_NAMESPACE,
    error_response,
    requested_max_tokens,
)
from ext_proc.router_state import RouterState
from ext_proc.scoring import content_length, default_max_tokens, estimate_prompt_tokens

CLIENT_FIELD = "client"
"""The client's name in the decision's dynamic metadata: the ledger books it."""

_MODELS_PATH = MODELS_PATH.encode()

INVALID_KEY = error_response(
    401,
    "missing or unknown API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'",
    kind="invalid_request_error",
    code="invalid_api_key",
)


def _request_facts(headers: ext_proc_pb2.HttpHeaders) -> tuple[bytes | None, bytes, bool, int]:
    """(key, path without its query, is the models list, content length) from the request
    headers."""
    pairs = [(h.key, h.raw_value) for h in headers.headers.headers]
    path = method = b""
    length = 0
    for name, value in pairs:
        if name == ":path":
            path = value.partition(b"?")[0]
        elif name == ":method":
            method = value
        elif name == "content-length":
            length = content_length(value)
    is_models = path == _MODELS_PATH and method == b"GET"
    return presented_key(pairs), path, is_models, length


def estimated_tokens(length: int, metadata: base_pb2.Metadata, path: bytes) -> int:
    """What tokens_per_minute counts: prompt bytes / 4 plus the requested output tokens (the
    edge's request-fields metadata), else what routing assumes for the path: the estimate
    ext_proc's decision prices."""
    fields = metadata.filter_metadata.get(REQUEST_NAMESPACE)
    default = default_max_tokens(path.decode("latin-1"))
    output = default if fields is None else requested_max_tokens(fields.fields, default)
    return estimate_prompt_tokens(length) + output


def _too_many(client: ClientRule, wait_s: float) -> ext_proc_pb2.ProcessingResponse:
    seconds = whole_seconds(wait_s)
    response = error_response(
        429,
        f"rate limit of client {client.name!r} reached "
        f"({client.requests_per_minute or '-'} requests, {client.tokens_per_minute or '-'} "
        f"tokens per minute); retry in {seconds} s",
        kind="requests",
        code="rate_limit_exceeded",
    )
    response.immediate_response.headers.set_headers.append(base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key="retry-after", raw_value=str(seconds).encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD))
    return response


def _over_budget(client: ClientRule, spent: float) -> ext_proc_pb2.ProcessingResponse:
    return error_response(
        429,
        f"client {client.name!r} has spent its budget (${spent:.4f} of ${client.budget_usd:g} "
        "in its window)",
        kind="insufficient_quota",
        code="insufficient_quota",
    )


def tag_client(response: ext_proc_pb2.ProcessingResponse, client: ClientRule) -> None:
    """Name the client in the decision metadata, routed or refused, so the ledger books it."""
    namespace = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value
    namespace.fields[CLIENT_FIELD].string_value = client.name


class Admission:
    """Per request: who is asking, and may they (see the module docstring)."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def admit(
        self, state: RouterState, request: ext_proc_pb2.ProcessingRequest
    ) -> ClientRule | ext_proc_pb2.ProcessingResponse | None:
        """The client (None: no clients declared, or a keyless models list), or the refusal."""
        if not state.clients.enabled or not request.HasField("request_headers"):
            return None
        key, path, is_models, length = _request_facts(request.request_headers)
        client = state.clients.lookup(key)
        if client is None:
            return None if is_models else INVALID_KEY
        if client.budget_usd is not None:
            spent = state.spent.get(client.name, 0.0)
            if spent >= client.budget_usd:
                refusal = _over_budget(client, spent)
                tag_client(refusal, client)
                return refusal
        if client.limited and not is_models:
            charges = []
            if client.requests_per_minute:
                charges.append(Charge(f"{client.name}:req", 1, client.requests_per_minute))
            if client.tokens_per_minute:
                tokens = estimated_tokens(length, request.metadata_context, path)
                charges.append(Charge(f"{client.name}:tok", tokens, client.tokens_per_minute))
            wait = await self.limiter.retry_after(charges)
            if wait is not None:
                refusal = _too_many(client, wait)
                tag_client(refusal, client)
                return refusal
        return client
