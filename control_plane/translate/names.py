"""Names fixed by the wire contract between the control plane, Envoy and ext_proc.

ext_proc does not import this (it is a separate deployable); it spells the same strings itself.
"""

from __future__ import annotations

LISTENER = "gpu-router.edge"
ROUTE_CONFIG = "gpu-router.routes"
EXT_PROC_CLUSTER = "gpu-router.ext_proc"
ACCESS_LOG_NAME = "gpu-router.edge"
"""The listener's access log: one entry per client request, its outcome."""
ATTEMPT_LOG_NAME = "gpu-router.attempt"
"""The router's upstream log: one entry per attempt on a provider."""

ROUTE_HEADER = "x-gpu-router-route"
"""Set by ext_proc to "<policy>/<provider>,<provider>,...": the ranked order, which names the
route; stripped from client requests."""
MODEL_HEADER = "x-gpu-router-model"
STRATEGY_HEADER = "x-gpu-router-strategy"
PROVIDER_RESPONSE_HEADER = "x-gpu-router-provider"
REASON_RESPONSE_HEADER = "x-gpu-router-reason"

METADATA_NAMESPACE = "gpu_router"
"""Dynamic-metadata namespace ext_proc writes, and filter_metadata key on clusters and endpoints."""
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
