"""Envoy's gRPC access-log service (envoy.service.accesslog.v3): attempts feed FleetHealth.

Every Envoy edge streams two logs here (cluster "gpu-router.xds"), each on its own stream
whose first message names it:

- ATTEMPT_LOG_NAME, the router's upstream_log, one entry per failed upstream attempt: each
  becomes a health sample for the provider it went to at once, so a provider that failed and
  was failed over from is still counted as failing; and for its (provider, model) once the
  request's entry has named the model (attribution.py); and it goes to the `on_attempt` hooks
  (the ledger keeps it for `why`);
- EDGE_LOG_NAME, the listener's log, one entry per client request: the client's outcome. It
  names the model of the request's failed attempts; when the last attempt served, the entry is
  that attempt's sample (its cluster, status and upstream timings: every served request counts
  in the EWMA); and it goes to the `on_request` hooks (ledger, audit) as read here once
  (client_request.py: its record, and the check of its times and sizes); they check its names
  against their own view of the policy (accounting.py).

Entries are checked one by one (validation.py), and read one by one: a bad entry is dropped
and counted, never costing its batch or its stream. Messages are parsed leniently
(wire_utf8.py): invalid UTF-8 in a string field is replaced, not a reason to end the stream.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from control_plane.policy.model import RoutingConfig
from control_plane.telemetry.attribution import ModelAttribution
from control_plane.telemetry.client_request import ClientRequest, read_client_request
from control_plane.telemetry.health import FleetHealth
from control_plane.telemetry.samples import (
    RequestSample,
    decided_model,
    sample_from_attempt_entry,
    served_sample,
)
from control_plane.telemetry.validation import (
    ATTEMPT,
    DEFAULT_LIMITS,
    EDGE,
    INVALID_UTF8,
    RETRY_AFTER_CAPPED,
    UNKNOWN_LOG_NAME,
    UNKNOWN_MODEL,
    UNPARSEABLE_MESSAGE,
    UNREADABLE,
    CountTelemetry,
    Limits,
    PolicyNames,
    attempt_problem,
    count_nothing,
    shaped_attempt_problem,
)
from control_plane.telemetry.wire_utf8 import Received, register_lenient, repaired_parts
from control_plane.translate.names import ACCESS_LOG_NAME as EDGE_LOG_NAME
from control_plane.translate.names import ATTEMPT_LOG_NAME
from control_plane.xds.peer import Admit, refuse_other_node, refuse_revoked, require_edge

logger = logging.getLogger(__name__)

ACCESS_LOG = "access_log"
"""The kind counted for a stream whose log name is not (yet) known."""
_KINDS = {ATTEMPT_LOG_NAME: ATTEMPT, EDGE_LOG_NAME: EDGE}
_SERVICE = als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name

RequestHook = Callable[[ClientRequest], None]
"""Called with each client-request entry (EDGE_LOG_NAME) as the receiver read it once."""
AttemptHook = Callable[[accesslog_pb2.HTTPAccessLogEntry, RequestSample], None]
"""Called with each believed failed-attempt entry (ATTEMPT_LOG_NAME) and its health sample."""


class AccessLogReceiver:
    """Turns streamed attempt entries into health samples and hands request entries to hooks.

    Samples are stamped with this process's clock on arrival, not with the Envoy host's,
    so that the health windows of many edges line up (Envoy flushes every 100 ms, so the
    arrival time is the attempt's end time to within that).
    """

    def __init__(
        self,
        fleet: FleetHealth,
        clock: Callable[[], float] = time.time,
        on_request: Iterable[RequestHook] = (),
        attribution: ModelAttribution | None = None,
        admit: Admit = require_edge,
        *,
        count: CountTelemetry = count_nothing,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._fleet = fleet
        self._admit = admit
        self._clock = clock
        self._count = count
        self._limits = limits
        self._names: PolicyNames | None = None
        self._attribution = ModelAttribution() if attribution is None else attribution
        self.on_request: list[RequestHook] = list(on_request)
        """Subscribers to client-request entries; append to subscribe."""
        self.on_attempt: list[AttemptHook] = []
        """Subscribers to believed failed attempts; append to subscribe."""

    def use_policy(self, config: RoutingConfig) -> None:
        """Believe attempts to this policy's providers only; the fleet forgets the others and
        learns their caps."""
        self._names = PolicyNames.of(config)
        self._fleet.use_policy(self._names.offerings,
                               {p.name: p.max_concurrency for p in config.providers})

    def register(self, server: grpc.aio.Server) -> None:
        """As the generated add_AccessLogServiceServicer_to_server, but with a request
        deserializer that does not end the stream on invalid UTF-8 (wire_utf8.py)."""
        register_lenient(server, _SERVICE, "StreamAccessLogs", self.StreamAccessLogs,
                         als_pb2.StreamAccessLogsMessage, als_pb2.StreamAccessLogsResponse,
                         stream_response=False)

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[Received[als_pb2.StreamAccessLogsMessage]],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        peer = await self._admit(context, "access logs")  # before a single entry is read
        # As the ALS API says, the identifier is sent in the first message of a stream only.
        node_id = log_name = ""
        entries = 0
        async for received in request_iterator:
            await refuse_revoked(context, peer, "access logs")  # revoked since it opened
            message = received.message
            if message is None:
                self._count(_KINDS.get(log_name, ACCESS_LOG), UNPARSEABLE_MESSAGE)
                continue
            if message.HasField("identifier"):
                node_id = message.identifier.node.id
                log_name = message.identifier.log_name
                await refuse_other_node(context, peer, node_id, f"access log {log_name!r}")
                if log_name in (ATTEMPT_LOG_NAME, EDGE_LOG_NAME):
                    logger.info(
                        "access log stream opened", extra={"node": node_id, "log_name": log_name}
                    )
                else:
                    logger.warning(
                        "access log stream with an unknown log name is ignored",
                        extra={"node": node_id, "log_name": log_name},
                    )
            kind = _KINDS.get(log_name, ACCESS_LOG)
            for _ in range(repaired_parts(received.repaired)):
                self._count(kind, INVALID_UTF8, dropped=False)
            if not message.HasField("http_logs"):
                continue
            log_entries = message.http_logs.log_entry
            entries += len(log_entries)
            if log_name == ATTEMPT_LOG_NAME:
                self._record_attempts(log_entries, node_id)
            elif log_name == EDGE_LOG_NAME:
                self._notify_requests(log_entries, node_id)
            else:
                for _ in log_entries:
                    self._count(kind, UNKNOWN_LOG_NAME)
        logger.info(
            "access log stream closed",
            extra={"node": node_id, "log_name": log_name, "entries": entries},
        )
        return als_pb2.StreamAccessLogsResponse()

    def _record_attempts(
        self, log_entries: Iterable[accesslog_pb2.HTTPAccessLogEntry], node_id: str
    ) -> None:
        now_ms = int(self._clock() * 1000)
        for entry in log_entries:
            try:
                self._record_attempt(entry, node_id, now_ms)
            except Exception:  # one entry never costs its batch or its stream
                logger.debug("unreadable attempt entry", exc_info=True, extra={"node": node_id})
                self._count(ATTEMPT, UNREADABLE)

    def _record_attempt(
        self, entry: accesslog_pb2.HTTPAccessLogEntry, node_id: str, now_ms: int
    ) -> None:
        problem = attempt_problem(entry, now_ms, self._limits, self._names)
        if problem is not None:
            self._count(ATTEMPT, problem)
            return
        sample = sample_from_attempt_entry(entry, node_id, at_unix_ms=now_ms)
        if sample is None:
            return
        cap = self._fleet.max_retry_after_s
        if sample.retry_after_s is not None and sample.retry_after_s > cap:
            self._count(ATTEMPT, RETRY_AFTER_CAPPED, dropped=False)
            sample = dataclasses.replace(sample, retry_after_s=cap)
        self._fleet.record(sample)
        attributed = self._attribution.attempt(sample, now_ms)
        if attributed is not None:
            self._record_model(attributed, ATTEMPT)
        _notify(self.on_attempt, node_id, entry, sample)

    def _served(self, request: ClientRequest, now_ms: int) -> RequestSample | None:
        """The sample of the attempt that served the request (not on the attempt log, which
        has only failed attempts), if the entry is believable as an attempt would be. A problem
        is not counted here: the request hooks (accounting) count the same entry's."""
        sample = served_sample(request.entry, request.record, request.node, at_unix_ms=now_ms)
        if sample is None or shaped_attempt_problem(request.entry, request.shape, now_ms,
                                                    self._limits, self._names):
            return None
        return sample

    def _record_model(self, sample: RequestSample, kind: str) -> None:
        """An attempt with its request's model: counted unless the provider does not offer it."""
        if self._fleet.knows(sample.provider, sample.model):
            self._fleet.record_model(sample)
        else:
            self._count(kind, UNKNOWN_MODEL)

    def _notify_requests(
        self, log_entries: Iterable[accesslog_pb2.HTTPAccessLogEntry], node_id: str
    ) -> None:
        now_ms = int(self._clock() * 1000)
        for entry in log_entries:
            try:
                request = read_client_request(entry, node_id, now_ms, self._limits)
                model = decided_model(entry) if request.record is None else request.record.model
                attributed = self._attribution.request(entry.request.request_id, model, now_ms)
                served = self._served(request, now_ms)
            except Exception:  # one entry never costs its batch or its stream
                logger.debug("unreadable request entry", exc_info=True, extra={"node": node_id})
                self._count(EDGE, UNREADABLE)
                continue
            for sample in attributed:
                self._record_model(sample, EDGE)
            if served is not None:
                self._fleet.record(served)  # for the provider and, known, for its model
            _notify(self.on_request, node_id, request)


def _notify(hooks: Iterable[Callable[..., None]], node_id: str, *args: object) -> None:
    """Call each hook with `args`; one failing subscriber must stop neither the stream nor the
    others (nor count its entry as unreadable)."""
    for hook in hooks:
        try:
            hook(*args)
        except Exception:
            logger.exception(
                "access log hook failed",
                extra={"node": node_id, "hook": getattr(hook, "__qualname__", repr(hook))},
            )
