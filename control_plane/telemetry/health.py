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

A 429 is not an error (the provider is up, only busy) but it is a request to back off: it
ejects the provider as a whole (model PROVIDER_WIDE, which ext_proc applies to every model)
until its Retry-After has passed (capped at `max_retry_after_s`, MAX_RETRY_AFTER_S by default:
an access-log entry can claim any Retry-After, and one claiming hours would eject a provider
fleet-wide for hours; `cooldown_s` without one). It never shortens a cooldown already running.

Once told the policy's offerings (`use_policy`), the table holds those providers and their
(provider, model) pairs only: samples and in-flight counts for others are ignored, and a
provider the policy drops is forgotten at once.

Requests in flight come from Envoy's load reports (load_reports.py), per provider only: each
edge reports per cluster, and a cluster is a provider. in_flight.py keeps each edge's last
report: the provider's figure is the sum over edges, and an edge's providers at their cap are
the snapshot's `at_cap`.

For timing an ejection (a benchmark reads these), every aggregate remembers when its current
failure episode began (the first error or 429 seen while its window held none) and when it
was last ejected.

Time is always passed in (a sample's at_unix_ms, or now_ms), so the whole module is pure and
tests without sleeping. The aggregates and their windows are health_tally.py's.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from control_plane.telemetry.health_tally import HealthState, Tally, ewma
from control_plane.telemetry.in_flight import InFlight
from control_plane.telemetry.samples import RequestSample
from gpu_router.api.v1 import health_pb2

PROVIDER_WIDE = ""
"""The model key of a provider's own aggregate over all its models."""
MAX_RETRY_AFTER_S = 60.0
"""The longest a provider's Retry-After ejects it for, unless configured otherwise."""


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
    reason: str
    """Why it is EJECTED or DEGRADED, e.g. "error rate 60% over 30 s"; empty when HEALTHY."""
    first_failure_unix_ms: int
    """When the current (or latest) failure episode began; 0 when none was ever seen."""
    last_ejected_unix_ms: int
    """When it was last ejected; 0 when never."""
    in_flight: int | None
    """Requests in progress fleet-wide (provider-wide entries); None for per-model entries."""


def _iso(unix_ms: int) -> str:
    return datetime.fromtimestamp(unix_ms / 1000.0, tz=UTC).isoformat(timespec="milliseconds")


def _iso_or_none(unix_ms: int) -> str | None:
    return _iso(unix_ms) if unix_ms else None


def _seconds(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


class FleetHealth:
    """Per-provider and per-(provider, model) health; `version` moves on every observable change."""

    def __init__(
        self,
        alpha: float = 0.3,
        window_s: float = 30.0,
        eject_error_rate: float = 0.5,
        eject_min_samples: int = 5,
        eject_consecutive: int = 5,
        cooldown_s: float = 10.0,
        max_retry_after_s: float = MAX_RETRY_AFTER_S,
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if window_s <= 0 or cooldown_s < 0 or max_retry_after_s < 0:
            raise ValueError(
                f"window_s must be > 0, cooldown_s and max_retry_after_s >= 0, "
                f"got {window_s}, {cooldown_s}, {max_retry_after_s}"
            )
        if not 0.0 < eject_error_rate <= 1.0 or eject_min_samples < 1 or eject_consecutive < 1:
            raise ValueError(
                f"eject_error_rate must be in (0, 1], eject_min_samples and eject_consecutive >= 1, "
                f"got {eject_error_rate}, {eject_min_samples}, {eject_consecutive}"
            )
        self._eject_consecutive = eject_consecutive
        self._alpha = alpha
        self._window_ms = int(window_s * 1000)
        self._eject_error_rate = eject_error_rate
        self._degrade_error_rate = eject_error_rate / 2
        self._eject_min_samples = eject_min_samples
        self._cooldown_ms = int(cooldown_s * 1000)
        self.max_retry_after_s = max_retry_after_s
        self._offerings: dict[str, frozenset[str]] | None = None
        self._window_text = _seconds(window_s)
        self._tallies: dict[tuple[str, str], Tally] = {}
        self._pushed_weights: dict[str, int] | None = None
        self._weights_pushed_at_ms = 0
        self._published_version: int | None = None
        self._in_flight = InFlight()
        self._caps: Mapping[str, int] = {}
        self.version = 0

    def use_policy(self, offerings: Mapping[str, Collection[str]], caps: Mapping[str, int]
                   ) -> None:
        """Hold only these providers (name -> the public models it offers) from now on, and
        each one's max_concurrency, the cap each edge puts on it (provider_cap.py); what was
        kept for any other provider or model is forgotten. One new version when either changed,
        none when a policy reload changed neither."""
        held = {provider: frozenset(models) for provider, models in offerings.items()}
        if held == self._offerings and caps == self._caps:
            return
        self._offerings, self._caps = held, dict(caps)
        stale = [key for key in self._tallies if not self.knows(*key)]
        for key in stale:
            del self._tallies[key]
        self._in_flight.keep(self.knows)
        self._hold_in_flight()
        self.version += 1

    def knows(self, provider: str, model: str = PROVIDER_WIDE) -> bool:
        """Whether the policy has this provider (and it offers `model`); any before
        use_policy."""
        if self._offerings is None:
            return True
        models = self._offerings.get(provider)
        return models is not None and (model == PROVIDER_WIDE or model in models)

    def record(self, sample: RequestSample) -> None:
        """Count one request (or attempt) for its (provider, model) and for the provider; a
        provider the policy does not have is ignored, and so is a model it does not offer."""
        if not self.knows(sample.provider):
            return
        provider_wide = self._record_into((sample.provider, PROVIDER_WIDE), sample)
        if sample.model and self.knows(sample.provider, sample.model):
            self._record_into((sample.provider, sample.model), sample)
        if sample.status == 429:
            self._back_off(provider_wide, sample)
        self.version += 1

    def record_model(self, sample: RequestSample) -> None:
        """Count an attempt for its (provider, model) only: record() counted it for the provider.

        Attempts learn their model after the fact (attribution.py), so they are recorded twice:
        at once for the provider, which is what ejects it, then for the model.
        """
        if sample.model and self.knows(sample.provider, sample.model):
            self._record_into((sample.provider, sample.model), sample)
            self.version += 1

    def record_in_flight(self, source: str, in_flight: Mapping[str, int], *, edge: str) -> None:
        """Replace what `source` (one report stream of the node `edge`) has in flight, per
        provider."""
        counts = {p: n for p, n in in_flight.items() if n > 0 and self.knows(p)}
        if self._in_flight.record(source, edge, counts):
            self._hold_in_flight()
            self.version += 1

    def forget_in_flight(self, source: str) -> None:
        """A source whose stream ended: nothing it reported is known to be in flight any more."""
        if self._in_flight.forget(source):
            self.version += 1

    def _hold_in_flight(self) -> None:
        """A provider seen in flight has an entry, measured or not."""
        for provider in self._in_flight.totals:
            self._tallies.setdefault((provider, PROVIDER_WIDE), Tally())

    def record_pushed_weights(self, weights: Mapping[str, int], now_ms: int) -> None:
        """Remember the cluster weights last pushed to Envoy, for to_json only."""
        self._pushed_weights = dict(weights)
        self._weights_pushed_at_ms = now_ms

    def record_published(self, version: int) -> None:
        """Remember which version reached the xDS server as a HealthSnapshot, for to_json only:
        whoever reads the JSON can tell whether what it sees has been sent out yet."""
        self._published_version = version

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
                in_flight=view.in_flight or 0,
            )
        for edge, providers in sorted(self._in_flight.at_cap(self._caps).items()):
            snapshot.at_cap.add(edge=edge, providers=providers)
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
                "cooldown_until": _iso_or_none(view.cooldown_until_unix_ms),
                "reason": view.reason,
                "first_failure_at": _iso_or_none(view.first_failure_unix_ms),
                "last_ejected_at": _iso_or_none(view.last_ejected_unix_ms),
            }
            if view.model == PROVIDER_WIDE:
                providers[view.provider] = {**fields, "in_flight": view.in_flight, "models": {}}
            else:
                providers[view.provider]["models"][view.model] = fields
        return {
            "version": self.version,
            "published_version": self._published_version,
            "generated_at": _iso(now_ms),
            "providers": providers,
            "weights": self._pushed_weights,
            "weights_pushed_at": _iso_or_none(self._weights_pushed_at_ms),
            "at_cap": self._in_flight.at_cap(self._caps),
        }

    def _record_into(self, key: tuple[str, str], sample: RequestSample) -> Tally:
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = Tally()
        now_ms = sample.at_unix_ms
        self._prune(tally, now_ms)
        error = sample.upstream_failure or sample.status >= 500
        rate_limited = sample.status == 429
        tally.samples += 1
        if not error and 200 <= sample.status < 400:
            tally.latency_samples += 1
            tally.ewma_latency_ms = ewma(tally.ewma_latency_ms, sample.total_ms, self._alpha)
            if sample.ttfb_ms > 0:
                tally.ewma_ttfb_ms = ewma(tally.ewma_ttfb_ms, sample.ttfb_ms, self._alpha)
        if (error or rate_limited) and not tally.failing:
            tally.failing = True
            tally.first_failure_ms = now_ms
        tally.add_outcome(now_ms, error, rate_limited)
        if now_ms >= tally.judged_since_ms:
            tally.judged += 1
            tally.judged_errors += error
            tally.consecutive_errors = tally.consecutive_errors + 1 if error else 0
        self._judge(tally, now_ms)
        return tally

    def _back_off(self, tally: Tally, sample: RequestSample) -> None:
        """Eject the provider until its Retry-After has passed; never shortens a cooldown."""
        if sample.retry_after_s is None:
            cooldown_ms = self._cooldown_ms
            reason = "rate limited (no Retry-After)"
        else:
            wait_s = min(sample.retry_after_s, self.max_retry_after_s)
            cooldown_ms = int(wait_s * 1000)
            reason = f"rate limited (Retry-After {_seconds(wait_s)} s)"
        until_ms = sample.at_unix_ms + cooldown_ms
        if tally.state is HealthState.EJECTED and tally.cooldown_until_ms >= until_ms:
            return
        tally.state = HealthState.EJECTED
        tally.cooldown_until_ms = until_ms
        tally.reason = reason
        tally.last_ejected_ms = sample.at_unix_ms

    def _prune(self, tally: Tally, now_ms: int) -> None:
        tally.prune(now_ms - self._window_ms)

    def _judge(self, tally: Tally, now_ms: int) -> None:
        if tally.state is HealthState.EJECTED and now_ms < tally.cooldown_until_ms:
            return
        error_rate = tally.judged_errors / tally.judged if tally.judged else 0.0
        by_rate = tally.judged >= self._eject_min_samples and error_rate >= self._eject_error_rate
        in_a_row = tally.consecutive_errors >= self._eject_consecutive
        if by_rate or in_a_row:
            tally.state = HealthState.EJECTED
            tally.cooldown_until_ms = now_ms + self._cooldown_ms
            tally.reason = (
                self._error_reason(error_rate)
                if by_rate
                else f"{tally.consecutive_errors} failures in a row"
            )
            tally.last_ejected_ms = now_ms
            tally.judged_since_ms = now_ms + 1
            tally.judged = tally.judged_errors = tally.consecutive_errors = 0
            return
        tally.cooldown_until_ms = 0
        if error_rate >= self._degrade_error_rate:
            tally.state = HealthState.DEGRADED
            tally.reason = self._error_reason(error_rate)
        else:
            tally.state = HealthState.HEALTHY
            tally.reason = ""
            if tally.window_errors == tally.window_429 == 0:
                tally.failing = False

    def _error_reason(self, error_rate: float) -> str:
        return f"error rate {error_rate:.0%} over {self._window_text} s"

    def _view(self, key: tuple[str, str], tally: Tally) -> ProviderHealth:
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
            reason=tally.reason,
            first_failure_unix_ms=tally.first_failure_ms,
            last_ejected_unix_ms=tally.last_ejected_ms,
            in_flight=self._in_flight.totals.get(key[0], 0) if key[1] == PROVIDER_WIDE else None,
        )
