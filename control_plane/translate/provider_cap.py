"""A provider's cap at each edge: at most its max_concurrency requests at once, the rest wait.

Envoy never retries a request a circuit breaker refused (an overflow): with a cap on requests,
the client got a 503 while other providers idled (64 clients on the default policy: 32 503s
from its cheapest provider, vast, max_concurrency 32). So the cap is on connections, each
carrying one request at a time (HTTP/1.1; h2 held to one stream a connection), and a request
over it waits in the cluster's queue of pending requests instead of being refused:

- max_connections = max_concurrency. A worker thread's pool with no connection to a host may
  open one over the limit rather than strand its queue, so a provider sees at most
  max_concurrency + endpoints x worker threads requests (Envoy's circuit-breaking docs).
- max_requests cannot bind (it refuses rather than queues); the connections bound the requests.
- max_pending_requests = what the fleet serves at once (fleet_concurrency); past it, overflow.
- A connection belongs to one worker thread's pool and counts against max_connections while
  idle, holding a slot that another thread's queue may wait for: idle connections close after
  IDLE_CONNECTION_S (Envoy's default is an hour). The price: a provider that gets less than a
  request per IDLE_CONNECTION_S on a thread pays a new connection (and TLS handshake) per request.
- max_retries: retries_in_flight.

The wait is the edge's, not the provider's: the fleet's latency of a provider is measured from
the first byte sent to it, so no latency shows a queue. The control plane names, per edge, the
providers at their cap from the edges' load reports (telemetry/in_flight.py), and ext_proc puts
others before them for that edge's requests (scoring._spill).
"""

from __future__ import annotations

from envoy.config.cluster.v3 import circuit_breaker_pb2
from envoy.config.core.v3 import base_pb2, protocol_pb2
from google.protobuf import wrappers_pb2

from control_plane.policy.model import RoutingConfig
from control_plane.translate.envoy_api import seconds

IDLE_CONNECTION_S = 2
_UNBOUNDED = 2**32 - 1

ONE_STREAM_H2 = protocol_pb2.Http2ProtocolOptions(
    max_concurrent_streams=wrappers_pb2.UInt32Value(value=1)
)
"""h2 to a provider (ALPN over TLS) held to one request a connection, as HTTP/1.1 is."""

CONNECTION_OPTIONS = protocol_pb2.HttpProtocolOptions(idle_timeout=seconds(IDLE_CONNECTION_S))
"""Every provider connection's: idle ones give their slot back after IDLE_CONNECTION_S."""


def fleet_concurrency(config: RoutingConfig) -> int:
    """What the fleet serves at once: the sum of every provider's max_concurrency."""
    return sum(p.max_concurrency for p in config.providers)


def retries_in_flight(config: RoutingConfig) -> int:
    """The edge-wide bound on retries in flight for the requests first sent to one provider.

    Envoy charges a retry to the cluster of the request's FIRST attempt, whatever provider the
    retry goes to. A retry budget (a share of that cluster's active requests) is the wrong guard
    there: a provider that fails fast has few requests in flight, so its budget refuses nearly every
    retry (91 client errors at 32 clients, each one a `retry_overflow`). The retry goes to another
    provider, whose own cap protects it; so the bound is what the fleet would accept anyway
    (fleet_concurrency), unless the policy sets one.
    Per request, attempts stay bounded by the route's num_retries (max_fallbacks)."""
    configured = config.failover.max_retries_in_flight
    return configured if configured is not None else fleet_concurrency(config)


def circuit_breakers(max_concurrency: int, max_retries: int,
                     max_waiting: int) -> circuit_breaker_pb2.CircuitBreakers:
    """The cap (above): `max_concurrency` connections, `max_waiting` requests waiting for one,
    `max_retries` retries of requests first sent here."""
    thresholds = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        priority=base_pb2.RoutingPriority.DEFAULT,
        max_connections=wrappers_pb2.UInt32Value(value=max_concurrency),
        max_requests=wrappers_pb2.UInt32Value(value=_UNBOUNDED),
        max_pending_requests=wrappers_pb2.UInt32Value(value=max_waiting),
        max_retries=wrappers_pb2.UInt32Value(value=max_retries),
    )
    return circuit_breaker_pb2.CircuitBreakers(thresholds=[thresholds])
