"""What the control plane knows about one finished request, from Envoy's access log.

The lead's access-log ingestion builds one RequestRecord per request; usage
normalisation, pricing, the ledger, the audit log and the metrics all read it, so
none of them depends on how Envoy delivered it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRecord:
    request_id: str
    at_unix_ms: int
    """When the request started (Envoy's start time), Unix milliseconds."""
    model: str
    """Public (canonical) model name."""
    policy: str
    strategy: str
    reason: str
    """ext_proc's one-phrase reason for its choice ("" when ext_proc did not decide)."""
    fallbacks: tuple[str, ...]
    """Providers Envoy may retry on, in order."""
    candidates: str
    """ext_proc's compact summary in rank order, e.g.
    "vast=0.000070;runpod=0.000126;lambda=x:gpu too small" (provider=score, or
    provider=x:exclusion reason); the first scored candidate is ext_proc's choice."""
    provider: str
    """Who finally served (after any failover); "" if nobody did."""
    attempts: int
    status: int
    """HTTP status sent to the client (0 = no response, e.g. the client went away)."""
    ttfb_ms: float
    total_ms: float
    stream: bool
    request_bytes: int
    response_bytes: int
    usage_text: str
    """Raw response text where usage was found: a JSON body from `"usage"` on, or the SSE
    `data: {...}` line(s) carrying usage; "" when nothing was captured."""
    ext_proc_us: int = 0
    """ext_proc's time on this request as Envoy's ext_proc filter measured it (0 = not called)."""
    route: str = ""
    """The Envoy route it took: a fallback route's name says the model and policy it served
    when ext_proc did not answer."""
    client: str = ""
    """The client whose key ext_proc admitted (its decision metadata); "" when none."""
    client_request_id: str = ""
    """The x-request-id the client sent, if any (printable ASCII, at most 200 characters).
    request_id is the edge's own, so no client can collide with another's records."""
    path: str = ""
    """The request's path as ext_proc saw it ("" when ext_proc did not decide)."""
    max_tokens: int = -1
    """max_completion_tokens or max_tokens from the body; -1 when it gave none (ext_proc then
    assumes its default): with request_bytes, what ext_proc's cost estimate was made from."""


def is_error_status(status: int) -> bool:
    """An upstream-side failure as the client saw it: no response (0), 429 or 5xx.
    Other 4xx are the client's own mistakes. The report and the metrics both count this."""
    return status == 0 or status == 429 or status >= 500
