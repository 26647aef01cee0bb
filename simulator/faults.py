"""Run-time faults a test or demo injects into a simulated provider.

Which requests a fault hits is decided by a counter, not a random draw, so a test can assert
exact outcomes: with rate r, request n (counted from when the fault was set, starting at 1) is hit
when ceil(n*r) > ceil((n-1)*r). Rate 1.0 hits every request, 0.5 hits the 1st, 3rd, 5th...
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

from simulator.profiles import SimProfile


class FaultMode(enum.Enum):
    NONE = "none"
    ERROR = "error"
    """Answer `status` (default 503) with an OpenAI-style error body."""
    RESET = "reset"
    """Read the request, then drop the connection with a TCP RST and no response."""
    RATE_LIMIT = "rate_limit"
    """429 with Retry-After: retry_after_s."""
    HANG = "hang"
    """Never answer; hold the connection until the client goes away."""
    NO_CAPACITY = "no_capacity"
    """503 with error code "no_capacity", message "no GPU capacity"."""


class FaultSpecError(ValueError):
    """A /_sim/fault or /_sim/latency body that does not describe a valid setting."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    mode: FaultMode = FaultMode.NONE
    rate: float = 1.0
    """Fraction of requests hit, 0..1."""
    status: int = 503
    """Status answered in ERROR mode."""
    retry_after_s: int = 2
    """Retry-After answered in RATE_LIMIT mode."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencyOverride:
    """Replaces parts of a provider's profile at run time; None keeps the profile's value."""

    ttfb_ms: float | None = None
    ttfb_jitter_ms: float | None = None
    ms_per_token: float | None = None

    def apply(self, profile: SimProfile) -> SimProfile:
        changes = {
            name: getattr(self, name)
            for name in ("ttfb_ms", "ttfb_jitter_ms", "ms_per_token")
            if getattr(self, name) is not None
        }
        return replace(profile, **changes)


def _object(body: object, what: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise FaultSpecError(f"{what} must be a JSON object, got {type(body).__name__}")
    return body


def _check_keys(body: Mapping[str, Any], allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise FaultSpecError(f"{what}: unknown keys {unknown}; allowed: {list(allowed)}")


def _number(body: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise FaultSpecError(f"{key} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _integer(body: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FaultSpecError(f"{key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def parse_fault(body: object) -> Fault:
    """A Fault from {"mode": ..., "rate": 1.0, "status": 503, "retry_after_s": 2}."""
    spec = _object(body, "fault")
    _check_keys(spec, ("mode", "rate", "status", "retry_after_s"), "fault")
    mode_name = spec.get("mode")
    try:
        mode = FaultMode(mode_name)
    except ValueError as error:
        modes = [m.value for m in FaultMode]
        raise FaultSpecError(f"mode must be one of {modes}, got {mode_name!r}") from error
    defaults = Fault()
    rate = _number(spec, "rate", 0.0, 1.0)
    status = _integer(spec, "status", 400, 599)
    retry_after_s = _integer(spec, "retry_after_s", 0, 86400)
    return Fault(
        mode=mode,
        rate=defaults.rate if rate is None else rate,
        status=defaults.status if status is None else status,
        retry_after_s=defaults.retry_after_s if retry_after_s is None else retry_after_s,
    )


def parse_latency(body: object) -> LatencyOverride:
    """A LatencyOverride from {"ttfb_ms": 5, "ttfb_jitter_ms": 0, "ms_per_token": 0}.

    {} clears the override: the profile applies again.
    """
    spec = _object(body, "latency")
    _check_keys(spec, ("ttfb_ms", "ttfb_jitter_ms", "ms_per_token"), "latency")
    limit = 600_000.0
    return LatencyOverride(
        ttfb_ms=_number(spec, "ttfb_ms", 0.0, limit),
        ttfb_jitter_ms=_number(spec, "ttfb_jitter_ms", 0.0, limit),
        ms_per_token=_number(spec, "ms_per_token", 0.0, limit),
    )


def is_hit(n: int, rate: Fraction) -> bool:
    """Whether the n-th request (from 1) under `rate` is hit (see the module docstring)."""
    return math.ceil(n * rate) > math.ceil((n - 1) * rate)


class FaultState:
    """The fault in force on one provider, and how many requests it has seen and hit."""

    def __init__(self) -> None:
        self.fault = Fault()
        self._rate = Fraction(1)
        self.seen = 0
        self.hit = 0

    def set(self, fault: Fault) -> None:
        """Put `fault` in force; its counter starts again at the next request."""
        self.fault = fault
        self._rate = Fraction(fault.rate).limit_denominator(10_000)
        self.seen = 0
        self.hit = 0

    def next_request(self) -> FaultMode:
        """The fault mode for the next API request (NONE when it is spared)."""
        if self.fault.mode is FaultMode.NONE:
            return FaultMode.NONE
        self.seen += 1
        if not is_hit(self.seen, self._rate):
            return FaultMode.NONE
        self.hit += 1
        return self.fault.mode

    def fails_health(self) -> bool:
        """Health checks fail only under an ERROR fault that hits every request."""
        return self.fault.mode is FaultMode.ERROR and self._rate == 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "mode": self.fault.mode.value,
            "rate": self.fault.rate,
            "status": self.fault.status,
            "retry_after_s": self.fault.retry_after_s,
            "seen": self.seen,
            "hit": self.hit,
        }
