"""One simulated GPU provider: an OpenAI-compatible API on 127.0.0.1:<port>, plus /_sim control.

API routes match on the path's suffix (/chat/completions, /completions, /embeddings, /models), so
the provider answers under any base-URL prefix ("/v1/..." in practice). Every request outside the
health path and /_sim/ is an API request: it is counted in the stats, then the fault in force may
hit it. Every response carries "x-sim-provider: <name>". Control API (never faulted or counted):

  GET  /_sim/stats    what was received, the fault in force, the effective latency profile
  POST /_sim/fault    {"mode": "error|reset|rate_limit|hang|no_capacity|none", "rate": 1.0,
                       "status": 503, "retry_after_s": 2}
  POST /_sim/latency  {"ttfb_ms": 5, "ttfb_jitter_ms": 0, "ms_per_token": 0}
                      ({} restores the profile)
  POST /_sim/reset    clear stats, fault and latency override

The health path answers 200 {"status": "ok"} whatever the fault, except mode "error" at rate 1.0,
which fails health checks with the fault's status too: a provider that fails every request is down,
while partial faults, resets, hangs, 429s and capacity droughts are for the router's own outlier
detection and failover to find.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Self

from simulator.faults import FaultMode, FaultState, LatencyOverride, parse_fault, parse_latency
from simulator.openai_api import (
    ApiError,
    Kind,
    completion_body,
    embeddings_body,
    error_body,
    models_body,
    plan_generation,
    request_model,
    require_model,
    stream_chunks,
)
from simulator.profiles import GENERIC_PROFILE, SimProfile, sample_ttfb_ms
from simulator.stats import ReceivedRequest, SimStats
from simulator.transport import HttpServer, Request, Responder

log = logging.getLogger(__name__)

_JSON = ("content-type", "application/json")

Route = Callable[[Mapping[str, Any], Responder], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class SimSpec:
    """What one simulated provider is: its name, where it listens, which model ids it serves."""

    name: str
    port: int
    """0 picks a free port (see ProviderSim.port once started)."""
    model_ids: tuple[str, ...]
    health_check_path: str = "/health"
    profile: SimProfile = GENERIC_PROFILE
    host: str = "127.0.0.1"


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _decode_object(raw: bytes) -> Mapping[str, Any] | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, Mapping) else None


def _profile_json(profile: SimProfile) -> dict[str, Any]:
    return {**asdict(profile), "usage_format": profile.usage_format.value}


class ProviderSim:
    """A running simulated provider; `async with ProviderSim(spec) as sim:` serves on sim.port."""

    def __init__(self, spec: SimSpec, *, seed: int | None = None) -> None:
        self.spec = spec
        self.stats = SimStats()
        self.faults = FaultState()
        self.latency = LatencyOverride()
        self._rng = random.Random(spec.name if seed is None else seed)
        self._response_ids = itertools.count(1)
        self._provider_header = ("x-sim-provider", spec.name)
        self._http = HttpServer(self.handle)
        self._port = 0
        self._routes: tuple[tuple[str, str, Route], ...] = (
            ("/chat/completions", "POST", self._chat),
            ("/completions", "POST", self._completion),
            ("/embeddings", "POST", self._embeddings),
            ("/models", "GET", self._models),
        )

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self._port}"

    @property
    def profile(self) -> SimProfile:
        """The profile in effect: the spec's, with any run-time latency override applied."""
        return self.latency.apply(self.spec.profile)

    async def start(self) -> None:
        self._port = await self._http.start(self.spec.host, self.spec.port)
        log.info(
            "listening",
            extra={
                "fields": {
                    "provider": self.spec.name,
                    "url": self.url,
                    "models": list(self.spec.model_ids),
                    "health_check_path": self.spec.health_check_path,
                    "profile": _profile_json(self.spec.profile),
                }
            },
        )

    async def stop(self) -> None:
        await self._http.stop()
        log.info("stopped", extra={"fields": {"provider": self.spec.name}})

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def handle(self, request: Request, responder: Responder) -> None:
        if request.path == self.spec.health_check_path:
            await self._health(request, responder)
        elif request.path.startswith("/_sim/"):
            await self._control(request, responder)
        else:
            await self._api(request, responder)

    async def _send_json(
        self, responder: Responder, status: int, value: object, *extra: tuple[str, str]
    ) -> None:
        await responder.send(status, _json_bytes(value), [_JSON, self._provider_header, *extra])

    async def _health(self, request: Request, responder: Responder) -> None:
        if request.method not in ("GET", "HEAD"):
            await self._send_json(
                responder,
                405,
                error_body(
                    f"{request.method} not allowed on {request.path}",
                    type="invalid_request_error",
                    code="method_not_allowed",
                ),
                ("allow", "GET, HEAD"),
            )
        elif self.faults.fails_health():
            await self._send_json(responder, self.faults.fault.status, {"status": "error"})
        else:
            await self._send_json(responder, 200, {"status": "ok"})

    async def _api(self, request: Request, responder: Responder) -> None:
        stats = self.stats  # a reset meanwhile starts new stats: the request stays in these
        stats.started()
        try:
            await self._answer_api(request, responder, stats)
        finally:
            stats.ended()

    async def _answer_api(self, request: Request, responder: Responder, stats: SimStats) -> None:
        body = _decode_object(request.body) if request.method == "POST" else None
        stats.record(
            ReceivedRequest(
                model=request_model(body),
                path=request.path,
                headers=request.headers,
                body_bytes=len(request.body),
                body=request.body,
            )
        )
        mode = self.faults.next_request()
        if mode is not FaultMode.NONE:
            await self._inject(mode, responder)
            return
        try:
            route = self._route(request)
            if request.method == "POST" and body is None:
                raise ApiError(
                    400, "the request body is not a valid JSON object", code="invalid_json"
                )
            await route(body or {}, responder)
        except ApiError as error:
            await self._send_json(responder, error.status, error.body())

    def _route(self, request: Request) -> Route:
        for suffix, method, route in self._routes:
            if request.path.endswith(suffix):
                if request.method != method:
                    raise ApiError(
                        405,
                        f"{request.method} not allowed on {request.path}",
                        code="method_not_allowed",
                    )
                return route
        raise ApiError(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")

    async def _inject(self, mode: FaultMode, responder: Responder) -> None:
        fault = self.faults.fault
        if mode is FaultMode.ERROR:
            await self._send_json(
                responder,
                fault.status,
                error_body(
                    f"simulated {fault.status} from {self.spec.name}",
                    type="server_error",
                    code="simulated_error",
                ),
            )
        elif mode is FaultMode.RATE_LIMIT:
            await self._send_json(
                responder,
                429,
                error_body(
                    f"rate limited by {self.spec.name}",
                    type="rate_limit_error",
                    code="rate_limit_exceeded",
                ),
                ("retry-after", str(fault.retry_after_s)),
            )
        elif mode is FaultMode.NO_CAPACITY:
            await self._send_json(
                responder,
                503,
                error_body("no GPU capacity", type="server_error", code="no_capacity"),
            )
        elif mode is FaultMode.RESET:
            responder.reset()
        elif mode is FaultMode.HANG:
            await responder.wait_for_client_to_leave()

    async def _sleep_ms(self, ms: float) -> None:
        if ms > 0:
            await asyncio.sleep(ms / 1000)

    async def _chat(self, body: Mapping[str, Any], responder: Responder) -> None:
        await self._generate(Kind.CHAT, body, responder)

    async def _completion(self, body: Mapping[str, Any], responder: Responder) -> None:
        await self._generate(Kind.COMPLETION, body, responder)

    async def _generate(self, kind: Kind, body: Mapping[str, Any], responder: Responder) -> None:
        model = require_model(body, self.spec.model_ids, self.spec.name)
        gen = plan_generation(kind, body, model=model, provider=self.spec.name)
        profile = self.profile
        prefix = "chatcmpl" if kind is Kind.CHAT else "cmpl"
        response_id = f"{prefix}-{self.spec.name}-{next(self._response_ids)}"
        created = int(time.time())
        usage_format = profile.usage_format
        await self._sleep_ms(sample_ttfb_ms(profile, self._rng))
        if not gen.stream:
            await self._sleep_ms(len(gen.tokens) * profile.ms_per_token)
            await self._send_json(
                responder,
                200,
                completion_body(
                    gen, response_id=response_id, created=created, usage_format=usage_format
                ),
            )
            return
        await responder.start_stream(
            200,
            [
                ("content-type", "text/event-stream"),
                ("cache-control", "no-cache"),
                self._provider_header,
            ],
        )
        for index, chunk in enumerate(
            stream_chunks(gen, response_id=response_id, created=created, usage_format=usage_format)
        ):
            if index:
                await self._sleep_ms(profile.ms_per_token)
            await responder.write(b"data: " + _json_bytes(chunk) + b"\n\n")
        await responder.write(b"data: [DONE]\n\n")
        await responder.end_stream()

    async def _embeddings(self, body: Mapping[str, Any], responder: Responder) -> None:
        model = require_model(body, self.spec.model_ids, self.spec.name)
        profile = self.profile
        response = embeddings_body(body, model=model, usage_format=profile.usage_format)
        await self._sleep_ms(sample_ttfb_ms(profile, self._rng))
        await self._send_json(responder, 200, response)

    async def _models(self, body: Mapping[str, Any], responder: Responder) -> None:
        await self._send_json(responder, 200, models_body(self.spec.model_ids, self.spec.name))

    async def _control(self, request: Request, responder: Responder) -> None:
        action = (request.method, request.path)
        if action == ("GET", "/_sim/stats"):
            await self._send_json(responder, 200, self.snapshot())
            return
        if action == ("POST", "/_sim/reset"):
            self.stats = SimStats()
            self.faults = FaultState()
            self.latency = LatencyOverride()
            log.info("reset", extra={"fields": {"provider": self.spec.name}})
            await self._send_json(responder, 200, self.snapshot())
            return
        setters = {"/_sim/fault": self._set_fault, "/_sim/latency": self._set_latency}
        setter = setters.get(request.path)
        if request.method != "POST" or setter is None:
            await self._send_json(
                responder,
                404,
                error_body(
                    f"no control route {request.method} {request.path}",
                    type="invalid_request_error",
                    code="unknown_url",
                ),
            )
            return
        try:
            setter(json.loads(request.body))
        except ValueError as error:  # FaultSpecError, or the body is not JSON
            await self._send_json(
                responder,
                400,
                error_body(str(error), type="invalid_request_error", code="invalid_control"),
            )
            return
        await self._send_json(responder, 200, self.snapshot())

    def _set_fault(self, body: object) -> None:
        self.faults.set(parse_fault(body))
        log.info(
            "fault set",
            extra={"fields": {"provider": self.spec.name, "fault": self.faults.snapshot()}},
        )

    def _set_latency(self, body: object) -> None:
        self.latency = parse_latency(body)
        log.info(
            "latency set",
            extra={"fields": {"provider": self.spec.name, "profile": _profile_json(self.profile)}},
        )

    def snapshot(self) -> dict[str, Any]:
        """The body of GET /_sim/stats."""
        return {
            "provider": self.spec.name,
            **self.stats.snapshot(),
            "faults": self.faults.snapshot(),
            "profile": _profile_json(self.profile),
        }
