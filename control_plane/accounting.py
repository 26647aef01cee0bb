"""Books every client request: usage, cost, the ledger (whose rows are the audit trail, see
audit.py), the opt-in audit file and the metrics.

Envoy's edge access log (one entry per client request, over gRPC ALS) carries the whole
story: ext_proc's decision ("gpu_router" dynamic metadata), what the edge's request-fields filter read
from the body ("gpu_router.request"), the usage text the response Lua filter captured
("gpu_router.usage"), who finally served and after how many attempts, and ext_proc's own
time (the latency field of its filter state, as a custom tag). Reading it here keeps all of this
off the client's path.

A request is booked once: the gRPC access log (`book_request`, with the entry the receiver read
once: telemetry/client_request.py) and the reconciler (which replays the edges' durable logs after
an outage, ledger/reconcile.py: `book`) both refuse a request id booked recently; the ledger's
unique index refuses one booked by an earlier process.

An entry is booked only when it is believable (telemetry/validation.py): its provider, model,
policy and client are those of the current policy (or of one replaced less than `max_duration_s` ago, for
requests in flight across an edit), its times and sizes are possible, it has a request id.
Any other is dropped and counted (gpu_router_telemetry_dropped_total{kind="edge"}).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from envoy.data.accesslog.v3 import accesslog_pb2

from control_plane.audit import KEEP_ROTATED, MAX_BYTES, AuditLog
from control_plane.client_spend import ClientSpend
from control_plane.ledger.attempts import AttemptRow
from control_plane.ledger.health_history import HealthRow
from control_plane.ledger.store import RETENTION_DAYS, LedgerWriter, LogOffset, ledger_row
from control_plane.metrics import Metrics
from control_plane.policy.model import RoutingConfig
from control_plane.telemetry.client_request import ClientRequest, read_client_request
from control_plane.telemetry.samples import RequestSample
from control_plane.telemetry.validation import (
    DEFAULT_LIMITS,
    EDGE,
    UNREADABLE,
    Limits,
    PolicyNames,
    RecentNames,
    decision_problem,
    edge_problem,
)
from control_plane.translate.fallback_routes import FALLBACK_REASON, fallback_route_names
from control_plane.usage.normalise import normalise
from control_plane.usage.pricing import MissingPriceError, PriceBook, cost_usd
from control_plane.usage.record import RequestRecord, is_error_status

RECENT_IDS = 100_000

log = logging.getLogger(__name__)


def _as_fallback(record: RequestRecord, policy: str, model: str, strategy: str) -> RequestRecord:
    """A request served on a fallback route (ext_proc did not answer): its route names the
    model and policy, so it is priced like any other, not booked at $0 under no model."""
    return dataclasses.replace(
        record, model=model, policy=policy, strategy=strategy, reason=FALLBACK_REASON
    )


class RecentIds:
    """The last `capacity` request ids booked, in booking order: what this process booked
    and may not yet have committed to the ledger."""

    def __init__(self, capacity: int = RECENT_IDS) -> None:
        self._capacity = capacity
        self._ids: set[str] = set()
        self._order: deque[str] = deque()

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def add(self, request_id: str) -> bool:
        """Whether it is new (and now remembered)."""
        if request_id in self._ids:
            return False
        self._ids.add(request_id)
        self._order.append(request_id)
        if len(self._order) > self._capacity:
            self._ids.discard(self._order.popleft())
        return True


class Accounting:
    """Subscribed to the access-log receiver; one `book_request` per client request (`book`
    for the reconciler's lines), O(1) writes."""

    def __init__(self, metrics: Metrics, ledger_path: Path | None, audit_path: Path | None, *,
                 retention_days: float = RETENTION_DAYS, audit_max_bytes: int = MAX_BYTES,
                 audit_keep: int = KEEP_ROTATED, limits: Limits = DEFAULT_LIMITS,
                 clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self._limits = limits
        self._clock = clock
        self._names: RecentNames | None = None
        """None until a policy is given: any name is believed (tests, tools)."""
        self._prices = PriceBook(prices={}, usage_formats={})
        self._ledger = None if ledger_path is None else LedgerWriter(
            ledger_path, retention_days=retention_days,
            on_drop=lambda rows, _error: metrics.count_dropped_rows(rows))
        self._audit = None if audit_path is None else AuditLog(
            audit_path, max_bytes=audit_max_bytes, keep=audit_keep)
        self._fallback_routes: dict[str, tuple[str, str, str]] = {}
        """Fallback route name -> (policy, model, strategy)."""
        self.booked = RecentIds()
        """Request ids this process booked lately (the reconciler skips them too)."""
        self.spend = ClientSpend(ledger_path)
        """Each budgeted client's spend in its window, from what is booked here and the ledger."""

    def use_policy(self, config: RoutingConfig) -> None:
        if self._names is None:
            self._names = RecentNames(grace_s=self._limits.max_duration_s)
        self._names.use(PolicyNames.of(config), int(self._clock() * 1000))
        self._prices = PriceBook.from_config(config)
        self.spend.use_policy(config)
        strategies = {p.name: p.strategy.value for p in config.policies}
        self._fallback_routes = {
            route: (policy, model, strategies[policy])
            for route, (policy, model) in fallback_route_names(config).items()
        }

    def book(self, entry: accesslog_pb2.HTTPAccessLogEntry, node: str) -> bool:
        """Book the client request `entry` closes, read here (the reconciler's lines); False
        as book_request."""
        try:
            request = read_client_request(entry, node, int(self._clock() * 1000), self._limits)
        except Exception:  # a field of the wrong type costs only its entry
            log.debug("unreadable edge entry", exc_info=True)
            self.metrics.count_telemetry(EDGE, UNREADABLE)
            return False
        return self.book_request(request)

    def book_request(self, request: ClientRequest) -> bool:
        """Book the client request an entry the receiver read closes; False when it closes
        none, was booked, or is not believed (then counted)."""
        record = self._believed_record(request)
        if record is None or not self.booked.add(record.request_id):
            return False
        usage = normalise(record, self._prices.usage_format(record.provider))
        price = self._prices.price(record.provider, record.model)
        try:
            cost = 0.0 if price is None else cost_usd(usage, price)
        except MissingPriceError as error:
            log.warning("unpriced usage", extra={"request_id": record.request_id, "error": str(error)})
            cost = 0.0
        self.metrics.observe(record, usage, cost)
        if record.client:
            self.spend.add(record.client, record.at_unix_ms, cost,
                           error=is_error_status(record.status),
                           tokens=usage.input_tokens + usage.output_tokens)
        if self._ledger is not None or self._audit is not None:
            row = ledger_row(record, usage, cost)
            if self._ledger is not None:
                self._ledger.add(row)
            if self._audit is not None:
                self._audit.add(row)
        return True

    def _believed_record(self, request: ClientRequest) -> RequestRecord | None:
        """The request's record, unless it closes none or is not believable (counted). Its
        times and sizes are as the reader checked them; its names are checked against this
        ledger's policies, on this ledger's clock."""
        record = request.record
        if record is None:
            return None
        names = None if self._names is None else self._names.at(int(self._clock() * 1000))
        if not record.model and record.route in self._fallback_routes:
            record = _as_fallback(record, *self._fallback_routes[record.route])
        problem = edge_problem(request.entry, request.shape, names) or decision_problem(
            record.model, record.policy, record.client, names)
        if problem is not None:
            self.metrics.count_telemetry(EDGE, problem)
            return None
        return record

    def mark_offset(self, offset: LogOffset) -> None:
        """The reconciler's position, committed after every request booked before it."""
        if self._ledger is not None:
            self._ledger.add_offset(offset)

    def add_health(self, row: HealthRow) -> None:
        """A health-history row, into the ledger's database (health_history.py)."""
        if self._ledger is not None:
            self._ledger.add_health(row)

    def add_attempt(self, entry: accesslog_pb2.HTTPAccessLogEntry, sample: RequestSample) -> None:
        """A believed failed upstream attempt (the access-log receiver checked it), into the
        ledger's database for `why` (attempts.py); nothing without a ledger."""
        if self._ledger is None:
            return
        row = AttemptRow.of(entry, sample)
        if row is not None:
            self._ledger.add_attempt(row)

    def close(self) -> None:
        for writer in (self._ledger, self._audit):
            if writer is not None:
                writer.close()
