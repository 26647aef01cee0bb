"""Fleet-wide provider health, aggregated from request samples of every Envoy.

Per (provider, model) and per provider as a whole (model ""), FleetHealth keeps a measured
latency (an EWMA over successful responses), windowed error and 429 rates, and a state:

- EJECTED when, among the samples since the last ejection still in the window, at least
  `eject_min_samples` were seen and the error rate (5xx or upstream failure) reached
  `eject_error_rate`. It stays EJECTED until `cooldown_s` has passed, then is judged again on
  the samples that arrived after the ejection only (half-open, like a circuit breaker): the
  errors that caused the ejection must not eject it again the moment the cooldown ends.
- DEGRADED when that error rate is at least half of `eject_error_rate`;
- HEALTHY otherwise.

Time is always passed in (a sample's at_unix_ms, or now_ms), so the whole module is pure and
tests without sleeping. Windows are deques pruned from the left by time, so a record is O(1)
amortised.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from control_plane.telemetry.samples import RequestSample
from gpu_router.api.v1 import health_pb2

PROVIDER_WIDE = ""
"""The model key of a provider's own aggregate over all its models."""


class HealthState(enum.Enum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    EJECTED = "ejected"


_STATE_TO_PROTO = {
    HealthState.HEALTHY: health_pb2.HEALTHY,
    HealthState.DEGRADED: health_pb2.DEGRADED,
    HealthState.EJECTED: health_pb2.EJECTED,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderHealth:
    """A read-only view of one (provider, model) aggregate at one instant."""

    provider: str
    model: str
    """Public model name, or PROVIDER_WIDE for the provider as a whole."""
    ewma_latency_ms: float | None
    """None until a successful response was seen."""
    ewma_ttfb_ms: float | None
    samples: int
    """Every sample ever recorded, not only those in the window."""
    latency_samples: int
    """Successful samples behind the EWMAs; 0 means the latency is unmeasured."""
    error_rate: float
    """Share of 5xx and upstream failures among the samples in the window."""
    rate_429: float
    state: HealthState
    cooldown_until_unix_ms: int
    """When an EJECTED entry is judged again; 0 when not ejected."""


@dataclass(frozen=True, slots=True)
class _Outcome:
    at_ms: int
    error: bool
    rate_limited: bool


@dataclass(slots=True)
class _Tally:
    """The mutable aggregate behind one ProviderHealth."""

    ewma_latency_ms: float | None = None
    ewma_ttfb_ms: float | None = None
    samples: int = 0
    latency_samples: int = 0
    window: deque[_Outcome] = field(default_factory=deque)
    window_errors: int = 0
    window_429: int = 0
    judged_since_ms: int = 0
    """Samples at or after this time (the last ejection) are the ones state is judged on."""
    judged: int = 0
    judged_errors: int = 0
    state: HealthState = HealthState.HEALTHY
    cooldown_until_ms: int = 0


def _ewma(previous: float | None, value: float, alpha: float) -> float:
    return value if previous is None else alpha * value + (1.0 - alpha) * previous


def _iso(unix_ms: int) -> str:
    return datetime.fromtimestamp(unix_ms / 1000.0, tz=UTC).isoformat(timespec="milliseconds")


class FleetHealth:
    """Per-provider and per-(provider, model) health; `version` moves on every observable change."""

    def __init__(
        self,
        alpha: float = 0.3,
        window_s: float = 30.0,
        eject_error_rate: float = 0.5,
        eject_min_samples: int = 5,
        cooldown_s: float = 10.0,
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if window_s <= 0 or cooldown_s < 0:
            raise ValueError(
                f"window_s must be > 0 and cooldown_s >= 0, got {window_s}, {cooldown_s}"
            )
        if not 0.0 < eject_error_rate <= 1.0 or eject_min_samples < 1:
            raise ValueError(
                f"eject_error_rate must be in (0, 1] and eject_min_samples >= 1, "
                f"got {eject_error_rate}, {eject_min_samples}"
            )
        self._alpha = alpha
        self._window_ms = int(window_s * 1000)
        self._eject_error_rate = eject_error_rate
        self._degrade_error_rate = eject_error_rate / 2
        self._eject_min_samples = eject_min_samples
        self._cooldown_ms = int(cooldown_s * 1000)
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self.version = 0

    def record(self, sample: RequestSample) -> None:
        """Count one request for its (provider, model) and for the provider as a whole."""
        self._record_into((sample.provider, PROVIDER_WIDE), sample)
        if sample.model:
            self._record_into((sample.provider, sample.model), sample)
        self.version += 1

    def refresh(self, now_ms: int) -> bool:
        """Age windows out and end cooldowns as of now_ms; True (and a new version) on change."""
        changed = False
        for tally in self._tallies.values():
            before = (len(tally.window), tally.state, tally.cooldown_until_ms)
            self._prune(tally, now_ms)
            self._judge(tally, now_ms)
            changed |= before != (len(tally.window), tally.state, tally.cooldown_until_ms)
        if changed:
            self.version += 1
        return changed

    def entries(self, now_ms: int) -> list[ProviderHealth]:
        """Every aggregate as of now_ms, sorted by (provider, model)."""
        self.refresh(now_ms)
        return [self._view(key, self._tallies[key]) for key in sorted(self._tallies)]

    def get(self, provider: str, model: str, now_ms: int) -> ProviderHealth | None:
        """One aggregate as of now_ms (model PROVIDER_WIDE for the provider as a whole)."""
        self.refresh(now_ms)
        tally = self._tallies.get((provider, model))
        return None if tally is None else self._view((provider, model), tally)

    def snapshot_proto(self, now_ms: int) -> health_pb2.HealthSnapshot:
        """The HealthSnapshot resource ("fleet") that ext_proc replicas receive over xDS."""
        snapshot = health_pb2.HealthSnapshot(generated_at_unix_ms=now_ms)
        for view in self.entries(now_ms):
            snapshot.entries.add(
                provider=view.provider,
                model=view.model,
                ewma_latency_ms=view.ewma_latency_ms or 0.0,
                ewma_ttfb_ms=view.ewma_ttfb_ms or 0.0,
                # ext_proc reads samples > 0 as "ewma_latency_ms is measured": count the evidence.
                samples=view.latency_samples,
                error_rate=view.error_rate,
                rate_429=view.rate_429,
                state=_STATE_TO_PROTO[view.state],
                cooldown_until_unix_ms=view.cooldown_until_unix_ms,
            )
        return snapshot

    def to_json(self, now_ms: int) -> dict[str, Any]:
        """The admin view: {"providers": {name: {...provider-wide, "models": {model: {...}}}}}."""
        providers: dict[str, dict[str, Any]] = {}
        for view in self.entries(now_ms):
            fields = {
                "ewma_latency_ms": view.ewma_latency_ms,
                "ewma_ttfb_ms": view.ewma_ttfb_ms,
                "samples": view.samples,
                "latency_samples": view.latency_samples,
                "error_rate": view.error_rate,
                "rate_429": view.rate_429,
                "state": view.state.value,
                "cooldown_until": _iso(view.cooldown_until_unix_ms)
                if view.cooldown_until_unix_ms
                else None,
            }
            if view.model == PROVIDER_WIDE:
                providers[view.provider] = {**fields, "models": {}}
            else:
                providers[view.provider]["models"][view.model] = fields
        return {"version": self.version, "generated_at": _iso(now_ms), "providers": providers}

    def _record_into(self, key: tuple[str, str], sample: RequestSample) -> None:
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = _Tally()
        now_ms = sample.at_unix_ms
        self._prune(tally, now_ms)
        error = sample.upstream_failure or sample.status >= 500
        rate_limited = sample.status == 429
        tally.samples += 1
        if not error and 200 <= sample.status < 400:
            tally.latency_samples += 1
            tally.ewma_latency_ms = _ewma(tally.ewma_latency_ms, sample.total_ms, self._alpha)
            if sample.ttfb_ms > 0:
                tally.ewma_ttfb_ms = _ewma(tally.ewma_ttfb_ms, sample.ttfb_ms, self._alpha)
        tally.window.append(_Outcome(now_ms, error, rate_limited))
        tally.window_errors += error
        tally.window_429 += rate_limited
        if now_ms >= tally.judged_since_ms:
            tally.judged += 1
            tally.judged_errors += error
        self._judge(tally, now_ms)

    def _prune(self, tally: _Tally, now_ms: int) -> None:
        horizon = now_ms - self._window_ms
        window = tally.window
        while window and window[0].at_ms <= horizon:
            old = window.popleft()
            tally.window_errors -= old.error
            tally.window_429 -= old.rate_limited
            if old.at_ms >= tally.judged_since_ms:
                tally.judged -= 1
                tally.judged_errors -= old.error

    def _judge(self, tally: _Tally, now_ms: int) -> None:
        if tally.state is HealthState.EJECTED and now_ms < tally.cooldown_until_ms:
            return
        error_rate = tally.judged_errors / tally.judged if tally.judged else 0.0
        if tally.judged >= self._eject_min_samples and error_rate >= self._eject_error_rate:
            tally.state = HealthState.EJECTED
            tally.cooldown_until_ms = now_ms + self._cooldown_ms
            tally.judged_since_ms = now_ms + 1
            tally.judged = tally.judged_errors = 0
            return
        tally.cooldown_until_ms = 0
        tally.state = (
            HealthState.DEGRADED if error_rate >= self._degrade_error_rate else HealthState.HEALTHY
        )

    @staticmethod
    def _view(key: tuple[str, str], tally: _Tally) -> ProviderHealth:
        in_window = len(tally.window)
        return ProviderHealth(
            provider=key[0],
            model=key[1],
            ewma_latency_ms=tally.ewma_latency_ms,
            ewma_ttfb_ms=tally.ewma_ttfb_ms,
            samples=tally.samples,
            latency_samples=tally.latency_samples,
            error_rate=tally.window_errors / in_window if in_window else 0.0,
            rate_429=tally.window_429 / in_window if in_window else 0.0,
            state=tally.state,
            cooldown_until_unix_ms=tally.cooldown_until_ms,
        )
