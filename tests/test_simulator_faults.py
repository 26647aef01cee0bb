"""Fault parsing and the deterministic hit counter."""

from __future__ import annotations

from fractions import Fraction

import pytest

from simulator.faults import (
    Fault,
    FaultMode,
    FaultSpecError,
    FaultState,
    LatencyOverride,
    is_hit,
    parse_fault,
    parse_latency,
)
from simulator.profiles import SimProfile


def hits(rate: float, count: int) -> list[bool]:
    state = FaultState()
    state.set(Fault(mode=FaultMode.ERROR, rate=rate))
    return [state.next_request() is FaultMode.ERROR for _ in range(count)]


def test_rate_one_hits_every_request_and_zero_none() -> None:
    assert hits(1.0, 5) == [True] * 5
    assert hits(0.0, 5) == [False] * 5


def test_rate_half_alternates_starting_with_a_hit() -> None:
    assert hits(0.5, 6) == [True, False, True, False, True, False]


@pytest.mark.parametrize("rate", [0.1, 0.25, 1 / 3, 0.7, 0.99])
def test_hits_over_a_window_match_the_rate_exactly(rate: float) -> None:
    fraction = Fraction(rate).limit_denominator(10_000)
    window = fraction.denominator
    assert sum(hits(rate, window)) == fraction.numerator


def test_is_hit_is_the_ceiling_step() -> None:
    assert [is_hit(n, Fraction(1, 3)) for n in range(1, 7)] == [
        True,
        False,
        False,
        True,
        False,
        False,
    ]


def test_set_restarts_the_counter() -> None:
    state = FaultState()
    state.set(Fault(mode=FaultMode.RESET, rate=0.5))
    assert [state.next_request() for _ in range(3)] == [
        FaultMode.RESET,
        FaultMode.NONE,
        FaultMode.RESET,
    ]
    state.set(Fault(mode=FaultMode.HANG, rate=0.5))
    assert state.next_request() is FaultMode.HANG
    assert state.snapshot()["seen"] == 1


def test_no_fault_counts_nothing() -> None:
    state = FaultState()
    assert state.next_request() is FaultMode.NONE
    assert (state.seen, state.hit) == (0, 0)


@pytest.mark.parametrize(
    ("fault", "fails"),
    [
        (Fault(mode=FaultMode.ERROR), True),
        (Fault(mode=FaultMode.ERROR, rate=0.5), False),
        (Fault(mode=FaultMode.NO_CAPACITY), False),
        (Fault(mode=FaultMode.HANG), False),
    ],
)
def test_only_a_total_error_fails_health(fault: Fault, fails: bool) -> None:
    state = FaultState()
    state.set(fault)
    assert state.fails_health() is fails


def test_parse_fault_defaults_and_values() -> None:
    assert parse_fault({"mode": "rate_limit"}) == Fault(mode=FaultMode.RATE_LIMIT)
    assert parse_fault({"mode": "error", "rate": 0.25, "status": 500}) == Fault(
        mode=FaultMode.ERROR, rate=0.25, status=500
    )
    assert parse_fault({"mode": "rate_limit", "retry_after_s": 9}).retry_after_s == 9


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "must be a JSON object"),
        ({}, "mode must be one of"),
        ({"mode": "boom"}, "mode must be one of"),
        ({"mode": "error", "rate": 1.5}, "rate must be a number in [0.0, 1.0]"),
        ({"mode": "error", "rate": True}, "rate must be a number"),
        ({"mode": "error", "status": 200}, "status must be an integer in [400, 599]"),
        ({"mode": "error", "status": 503.0}, "status must be an integer"),
        ({"mode": "rate_limit", "retry_after_s": -1}, "retry_after_s must be an integer"),
        ({"mode": "error", "colour": "red"}, "unknown keys ['colour']"),
    ],
)
def test_parse_fault_rejects_with_a_clear_message(body: object, message: str) -> None:
    with pytest.raises(FaultSpecError) as error:
        parse_fault(body)
    assert message in str(error.value)


def test_latency_override_replaces_only_given_fields() -> None:
    profile = SimProfile(ttfb_ms=40.0, ttfb_jitter_ms=8.0, ms_per_token=2.0)
    override = parse_latency({"ttfb_ms": 5})
    assert override == LatencyOverride(ttfb_ms=5.0)
    assert override.apply(profile) == SimProfile(ttfb_ms=5.0, ttfb_jitter_ms=8.0, ms_per_token=2.0)
    assert parse_latency({}).apply(profile) == profile


@pytest.mark.parametrize("body", [{"ttfb_ms": -1}, {"ttfb_ms": "fast"}, {"delay": 3}, "5"])
def test_parse_latency_rejects(body: object) -> None:
    with pytest.raises(FaultSpecError):
        parse_latency(body)
