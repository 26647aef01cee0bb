"""Deployment knobs of the edge that are not policy: where things listen, limits, timeouts.

Kept apart from the policy so one policy file runs unchanged on a laptop and in production.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeSettings:
    edge_host: str = "127.0.0.1"
    edge_port: int = 10000
    ext_proc_endpoints: tuple[tuple[str, int], ...] = (("127.0.0.1", 50051),)
    """(host, port) of every ext_proc replica; Envoy balances streams over them."""
    xds_cluster: str = "gpu-router.xds"
    """The bootstrap's static xDS cluster; also the gRPC access-log target."""
    buffer_limit_bytes: int = 32 * MIB
    """Per-connection buffer on the listener and every cluster, and the routes' request-body
    buffer (the edge and upstream Lua filters read whole bodies): large prompts must not 413."""
    ext_proc_message_timeout_ms: int = 200
    """How long Envoy waits for ext_proc's answer before failure_mode_allow sends the request on
    the fallback route. ext_proc answers in about a millisecond; 200 ms (Envoy's default) leaves
    two orders of magnitude for a loaded machine (a 2-core CI runner, a GC pause) while bounding
    what an overloaded-but-alive replica costs a request. A frozen or crashed replica costs less:
    the ext_proc cluster's health check and outlier detection take it out of service, after which
    Envoy fails the stream at once (see clusters.ext_proc_cluster)."""
    ext_proc_closed_message_timeout_ms: int = 1000
    """The same wait when the edge fails closed (clients declared: ext_proc_fail_open off). A late
    answer then costs the request, which Envoy answers 504, not only its decision, and a queue
    in ext_proc is what makes an answer late: at 64 clients on the 2-core machine Envoy timed
    ext_proc's answers at up to 100-250 ms (a CPU-bound process beside the stack), and a CI run
    answered 12 requests 504 at 200 ms. A frozen replica is still taken out by its health check
    after which Envoy fails the stream at once (503): the longer wait is paid only by requests
    already waiting on it, which fail either way."""
    upstream_timeout_s: int = 300
    """Whole-response timeout of a routed request; LLM generations are long."""
    access_log_flush_ms: int = 100
    access_log_buffer_bytes: int = 256 * 1024
    """Envoy's gRPC access loggers send a batch when it reaches this size or every
    access_log_flush_ms, whichever comes first. Envoy's 16 KiB default made a message of every
    ~13 requests (an edge entry is ~1.2 KB): under load the batches' gRPC overhead cost both Envoy
    and the control plane. An entry still waits at most access_log_flush_ms."""
    decision_log_stdout: bool = False
    """Also write one JSON line per request (the decision next to its outcome) on Envoy's stdout
    (`--edge-decision-log`). Off by default: formatting and writing it is edge CPU on every
    request, and the same facts are in the ledger, the audit log and `gpu-router why`."""
    capture_usage: bool = True
    """Copy each response's usage into the access log for billing (an edge Lua filter)."""
    ext_proc_fail_open: bool = True
    """Without ext_proc's answer a request goes on along the fallback routes. translate() turns
    this off when the policy declares clients: only ext_proc checks keys, so without it the edge
    answers 503 (504 when ext_proc's answer is late) rather than serve unauthenticated requests."""
    edge_tls: bool = False
    """The edge listener serves TLS only (HTTP/1.1 and h2 by ALPN), with the certificate the
    control plane pushes over SDS (control_plane/edge_certificate.py); False: plain HTTP."""
    ext_proc_crl: bytes = b""
    """The fleet's CRL (PEM, gpu_router/revocation.py) the edges check each ext_proc replica's
    certificate against; empty: none is revoked. The control plane sends it with the ext_proc
    cluster, so a revocation reaches every edge with the next config."""
    trusted_ca_file: str = "/etc/ssl/certs/ca-certificates.crt"
    edge_log_dir: str | None = None
    """Directory (on the edge's host, existing) where each edge also appends every client request
    to <node id>.access.jsonl, which the control plane reconciles against the ledger
    (translate/durable_log.py); None: no such file."""
