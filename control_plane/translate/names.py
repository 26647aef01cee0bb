"""Names fixed by the wire contract between the control plane, Envoy and ext_proc.

ext_proc does not import this (it is a separate deployable); it spells the same strings itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

LISTENER = "gpu-router.edge"
ROUTE_CONFIG = "gpu-router.routes"
EXT_PROC_CLUSTER = "gpu-router.ext_proc"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
"""The ext_proc filter's name, which is also the name of its filter state."""
EDGE_CERTIFICATE_SECRET = "gpu-router.edge-certificate"
"""The secret (static in each edge's bootstrap, gpu_router/bootstrap.py, or the SDS file of its
secrets directory, edge_secret_files.py) holding the node's own certificate and key: what it
presents to ext_proc. The key never leaves the edge's machine."""
FLEET_CA_SECRET = "gpu-router.fleet-ca"
"""The secret holding the fleet's CA, which an ext_proc replica's certificate must chain to."""
ACCESS_LOG_NAME = "gpu-router.edge"
"""The listener's access log: one entry per client request, its outcome."""
ATTEMPT_LOG_NAME = "gpu-router.attempt"
"""The router's upstream log: one entry per attempt on a provider."""

ROUTE_HEADER = "x-gpu-router-route"
"""Set by ext_proc to "<policy>/<model>/<attempts>" (routes.route_header_value): which route
of the policy and model, the order itself riding in the decision metadata (ORDER_METADATA_KEY);
stripped from client requests."""
MODEL_HEADER = "x-gpu-router-model"
STRATEGY_HEADER = "x-gpu-router-strategy"
CLIENT_KEY_HEADERS = ("authorization", "x-api-key")
"""Where clients send their gpu-router key (ext_proc's clients.presented_key)."""
PROVIDER_RESPONSE_HEADER = "x-gpu-router-provider"
REASON_RESPONSE_HEADER = "x-gpu-router-reason"

CLIENT_REQUEST_ID_HEADER = "x-gpu-router-client-request-id"
"""The client's own x-request-id, moved here before Envoy makes the edge's (listeners.py): the
ledger and audit ids are the edge's, so no client can collide with another's records."""

CLIENT_HEADERS_DROPPED: Mapping[str, str] = MappingProxyType({
    "openai-organization": "chooses which of the operator's OpenAI organizations pays",
    "openai-project": "chooses which of the operator's projects pays and whose limits apply",
    "openai-beta": "opts into beta APIs whose pricing and usage reports the ledger does not know",
    "anthropic-beta": "opts into costlier beta features (e.g. long context) on Anthropic-style APIs",
    "cookie": "the client's cookies are the edge's; none is a session with a provider",
    "forwarded": "the client's claim about its address: providers rate-limit and ban by it",
    "x-forwarded-for": "the same claim; providers see the operator's account, not the client",
    "x-forwarded-host": "the same kind of claim, about the host the client asked for",
    "x-real-ip": "the same claim, as some proxies spell it",
    CLIENT_REQUEST_ID_HEADER: "the client's id is logged by the edge; providers get the edge's",
})
"""Client request headers no provider sees, and why (removed on every route, routes.py). Also:
authorization and every provider's credential header (replaced per attempt, upstream_lua.py);
x-gpu-router-route (dropped before routing, listeners.py); x-request-id (replaced by the edge's
own). Envoy itself ignores the x-envoy-* control headers (retries, timeouts) of an external
request: the edge treats no client address as internal (Envoy 1.40's empty
internal_address_config), which tests/test_translate_envoy.py checks."""
CLIENT_HEADERS_OVERWRITTEN: Mapping[str, tuple[str, str]] = MappingProxyType({
    "accept-encoding": (
        "identity",
        "a compressed response would hide its usage report from the edge's usage capture",
    ),
})
"""Client request headers every provider gets with the edge's value instead: name -> (value, why)."""

METADATA_NAMESPACE = "gpu_router"
"""Dynamic-metadata namespace ext_proc writes, and filter_metadata key on clusters and endpoints."""
ORDER_METADATA_KEY = "priority_groups"
"""Its key for the request's ranked order, [{"name": provider}, ...]: what the policy routes'
priority_group cluster specifier reads (routes.py; ext_proc's ORDER_KEY)."""
REQUEST_METADATA_NAMESPACE = "gpu_router.request"
"""Dynamic-metadata namespace the edge's request-fields filter fills from the request body,
forwarded to ext_proc."""
USAGE_METADATA_NAMESPACE = "gpu_router.usage"
"""Dynamic-metadata namespace the edge's usage-capture Lua filter writes (see usage_capture.py)."""
USAGE_METADATA_TEXT_KEY = "text"
"""Its one key: the response text carrying the provider's usage report."""


def credential_secret(provider: str) -> str:
    """The SDS secret holding a provider's API key."""
    return f"gpu-router.credential.{provider}"

INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
"""The OpenAI paths the router sends to providers (ext_proc's ROUTED_PATHS)."""
MODELS_PATH = "/v1/models"
FALLBACK_ROUTE_PREFIX = "fallback/"
"""Routes taken without ext_proc's answer are named "fallback/<policy>/<model>": the access log
carries the route name, so the control plane books such a request under its model and policy."""
EDGE_LISTENER_SECRET = "gpu-router.edge-listener-certificate"
"""The SDS secret holding the certificate and key the edge listener serves to clients."""
