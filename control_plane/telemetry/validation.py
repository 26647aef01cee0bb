"""What the control plane believes of the telemetry an edge sends, and why the rest is dropped.

Even an authenticated edge's access-log entries and load reports steer fleet-wide state (a 429
ejects a provider everywhere, an edge entry writes the ledger and metric labels), so each one
is checked on its own before it is used:

- its cluster must be a provider of the current policy (or empty, or internal "gpu-router.*"),
  and an edge entry's model, policy and client names those of the current policy (or none):
  otherwise invented names would grow the health table, the ledger and the metric labels
  without bound;
- its start time may not lie in the future beyond `clock_skew_s` (one such entry used to wipe
  the dashboard's hour of history), and an attempt may not be older than the longest request
  (`max_duration_s` plus the skew): health is about now;
- no duration may be negative or longer than `max_duration_s`, no byte count above `max_bytes`
  (uint64 on the wire: a forged -1 arrives as 2^64-1 and would be priced as tokens);
- an edge entry needs a request id, which is what the ledger books it under.

Each failing entry is dropped and counted by kind ("attempt", "edge", "load_report") and reason;
entries that are kept after a repair (invalid UTF-8 replaced, Retry-After capped) are counted
as repaired. Names are checked against a PolicyNames; None means no policy was given (tests,
tools) and any name goes: the control plane gives its policy before it opens its port. Pure:
the time is passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Protocol

from envoy.data.accesslog.v3 import accesslog_pb2

from control_plane.policy.model import RoutingConfig
from control_plane.telemetry.samples import INTERNAL_CLUSTER_PREFIX, unix_ms

ATTEMPT, EDGE, LOAD_REPORT = "attempt", "edge", "load_report"
"""Kinds of telemetry: an upstream attempt entry, a client-request entry, a load report."""

UNKNOWN_CLUSTER = "unknown_cluster"
UNKNOWN_MODEL = "unknown_model"
UNKNOWN_POLICY = "unknown_policy"
UNKNOWN_CLIENT = "unknown_client"
UNKNOWN_LOG_NAME = "unknown_log_name"
FUTURE_START = "future_start"
TOO_OLD = "too_old"
BAD_DURATION = "bad_duration"
BAD_SIZE = "bad_size"
BAD_COUNT = "bad_count"
NO_REQUEST_ID = "no_request_id"
UNREADABLE = "unreadable"
"""Reading the entry raised (a field of the wrong type, a packed value that does not parse)."""
UNPARSEABLE_MESSAGE = "unparseable_message"
"""A whole gRPC message whose wire format is broken: its entries are lost, the stream is not."""
INVALID_UTF8 = "invalid_utf8"
RETRY_AFTER_CAPPED = "retry_after_capped"

_DURATIONS = attrgetter(*(
    f.name for f in accesslog_pb2.AccessLogCommon.DESCRIPTOR.fields
    if f.message_type is not None and f.message_type.full_name == "google.protobuf.Duration"
))
"""Every Duration of an entry's common properties, in one call; an unset one reads as 0 s."""
_SIZES = (
    (attrgetter("common_properties"), attrgetter(
        "downstream_wire_bytes_sent", "downstream_wire_bytes_received",
        "upstream_wire_bytes_sent", "upstream_wire_bytes_received")),
    (attrgetter("request"), attrgetter(
        "request_headers_bytes", "request_body_bytes", "upstream_header_bytes_sent",
        "downstream_header_bytes_received")),
    (attrgetter("response"), attrgetter(
        "response_headers_bytes", "response_body_bytes", "upstream_header_bytes_received",
        "downstream_header_bytes_sent")),
)
"""(part of an entry, its byte counts), each read in one call: this runs for every entry."""


class CountTelemetry(Protocol):
    """Where drops and repairs are counted (Metrics.count_telemetry)."""

    def __call__(self, kind: str, reason: str, *, dropped: bool = True) -> None: ...


def count_nothing(kind: str, reason: str, *, dropped: bool = True) -> None:
    """The default CountTelemetry of a receiver built without metrics (tests, tools)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    clock_skew_s: float = 60.0
    """How far in the future an entry may start: the edges' clocks are not ours."""
    max_duration_s: float = 3600.0
    """The longest request or attempt believed (the edge's own route timeout is 300 s)."""
    max_bytes: int = 1 << 30
    """The largest byte count believed for any header block or body."""
    max_in_flight: int = 1_000_000
    """The most requests in progress one load report may claim for one cluster."""


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class PolicyNames:
    """The names telemetry may use: what one policy (or a short history of them) defines."""

    offerings: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Provider -> the public models it offers."""
    models: frozenset[str] = frozenset()
    policies: frozenset[str] = frozenset()
    clients: frozenset[str] = frozenset()

    @classmethod
    def of(cls, config: RoutingConfig) -> PolicyNames:
        return cls(
            offerings={p.name: frozenset(o.model for o in p.offerings) for p in config.providers},
            models=frozenset(m.name for m in config.models),
            policies=frozenset(p.name for p in config.policies),
            clients=frozenset(c.name for c in config.clients),
        )

    def union(self, other: PolicyNames) -> PolicyNames:
        offerings = {name: models | other.offerings.get(name, frozenset())
                     for name, models in self.offerings.items()}
        offerings.update((n, m) for n, m in other.offerings.items() if n not in offerings)
        return PolicyNames(offerings, self.models | other.models, self.policies | other.policies,
                           self.clients | other.clients)

    def knows_cluster(self, cluster: str) -> bool:
        """A provider's cluster, an internal one, or none (ext_proc answered itself)."""
        return not cluster or cluster.startswith(INTERNAL_CLUSTER_PREFIX) or cluster in self.offerings


class RecentNames:
    """The current policy's names, plus those of replaced policies for `grace_s` after they
    were replaced: a request in flight while its provider was removed is still booked."""

    def __init__(self, grace_s: float) -> None:
        self._grace_ms = int(grace_s * 1000)
        self._current = PolicyNames()
        self._retired: list[tuple[int, PolicyNames]] = []
        """(until when, names) of replaced policies."""
        self._known = self._current
        """The union of current and retired names, kept until either changes (asked per entry)."""

    def use(self, names: PolicyNames, now_ms: int) -> None:
        self._retired.append((now_ms + self._grace_ms, self._current))
        self._current = names
        self._known = self._union()

    def at(self, now_ms: int) -> PolicyNames:
        if any(until <= now_ms for until, _ in self._retired):
            self._retired = [(until, names) for until, names in self._retired if until > now_ms]
            self._known = self._union()
        return self._known

    def _union(self) -> PolicyNames:
        known = self._current
        for _, names in self._retired:
            known = known.union(names)
        return known


def shape_problem(entry: accesslog_pb2.HTTPAccessLogEntry, now_ms: int,
                  limits: Limits) -> str | None:
    """The half of an entry's check that names nothing (its start, durations and sizes): the
    same for every reader, so the receiver does it once for a client-request entry."""
    common = entry.common_properties
    if unix_ms(common.start_time) > now_ms + limits.clock_skew_s * 1000:
        return FUTURE_START
    for value in _DURATIONS(common):
        if value.seconds < 0 or value.nanos < 0 or value.seconds > limits.max_duration_s:
            return BAD_DURATION
    for part, sizes in _SIZES:
        if max(sizes(part(entry))) > limits.max_bytes:
            return BAD_SIZE
    return None


def _cluster_problem(cluster: str, names: PolicyNames | None) -> str | None:
    return None if names is None or names.knows_cluster(cluster) else UNKNOWN_CLUSTER


def attempt_problem(entry: accesslog_pb2.HTTPAccessLogEntry, now_ms: int, limits: Limits,
                    names: PolicyNames | None) -> str | None:
    """Why an upstream attempt entry must not become a health sample; None when it may. The
    cluster first: an unknown one is that, whatever its times."""
    return (_cluster_problem(entry.common_properties.upstream_cluster, names)
            or shape_problem(entry, now_ms, limits) or _age_problem(entry, now_ms, limits))


def shaped_attempt_problem(entry: accesslog_pb2.HTTPAccessLogEntry, shape: str | None,
                           now_ms: int, limits: Limits, names: PolicyNames | None) -> str | None:
    """attempt_problem of an entry whose shape_problem is `shape` (read once:
    client_request.py). attempt_problem does not call this: it reads the shape only for a known
    cluster, so an entry of an unknown one is counted as that even when its times are
    unreadable."""
    return (_cluster_problem(entry.common_properties.upstream_cluster, names)
            or shape or _age_problem(entry, now_ms, limits))


def _age_problem(entry: accesslog_pb2.HTTPAccessLogEntry, now_ms: int,
                 limits: Limits) -> str | None:
    """Health is about now: an attempt older than the longest request (and the skew) is not."""
    horizon_ms = now_ms - (limits.max_duration_s + limits.clock_skew_s) * 1000
    return TOO_OLD if unix_ms(entry.common_properties.start_time) < horizon_ms else None


def edge_problem(entry: accesslog_pb2.HTTPAccessLogEntry, shape: str | None,
                 names: PolicyNames | None) -> str | None:
    """Why a client-request entry whose shape_problem is `shape` must not be booked; None when
    it may. (How old it may be is the ledger's retention, store.py: the reconciler books
    entries from an outage.)"""
    problem = _cluster_problem(entry.common_properties.upstream_cluster, names) or shape
    if problem is None and not entry.request.request_id:
        return NO_REQUEST_ID
    return problem


def decision_problem(model: str, policy: str, client: str,
                     names: PolicyNames | None) -> str | None:
    """Why a booked request's model, policy or client names are not believed; empty ones
    are."""
    if names is None:
        return None
    if model and model not in names.models:
        return UNKNOWN_MODEL
    if policy and policy not in names.policies:
        return UNKNOWN_POLICY
    if client and client not in names.clients:
        return UNKNOWN_CLIENT
    return None


def checked_in_flight(
    reported: Iterable[tuple[str, int]], knows: Callable[[str], bool] | None, limits: Limits,
    count: CountTelemetry,
) -> dict[str, int]:
    """A load report's (cluster, requests in progress), internal clusters left out, the
    providers `knows` (any when None) with believable counts only; the rest counted."""
    kept: dict[str, int] = {}
    for cluster, in_flight in reported:
        if cluster.startswith(INTERNAL_CLUSTER_PREFIX):
            continue
        if knows is not None and not knows(cluster):
            count(LOAD_REPORT, UNKNOWN_CLUSTER)
        elif in_flight > limits.max_in_flight:
            count(LOAD_REPORT, BAD_COUNT)
        else:
            kept[cluster] = in_flight
    return kept

