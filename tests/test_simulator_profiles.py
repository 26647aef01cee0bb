"""Built-in provider profiles and the TTFB distribution."""

from __future__ import annotations

import random
import statistics

from simulator.profiles import (
    BUILTIN_PROFILES,
    GENERIC_PROFILE,
    SimProfile,
    UsageFormat,
    profile_for,
    sample_ttfb_ms,
)


def test_default_policy_providers_have_distinct_profiles() -> None:
    assert set(BUILTIN_PROFILES) == {"lambda", "coreweave", "vast", "runpod"}
    assert (
        profile_for("coreweave").ttfb_ms
        < profile_for("lambda").ttfb_ms
        < profile_for("runpod").ttfb_ms
        < profile_for("vast").ttfb_ms
    )
    assert profile_for("someone-else") is GENERIC_PROFILE
    assert GENERIC_PROFILE.usage_format is UsageFormat.OPENAI


def test_no_jitter_is_constant() -> None:
    profile = SimProfile(ttfb_ms=12.0)
    assert {sample_ttfb_ms(profile, random.Random(1)) for _ in range(5)} == {12.0}


def test_ttfb_is_lognormal_around_the_median() -> None:
    profile = BUILTIN_PROFILES["vast"]
    rng = random.Random(7)
    draws = [sample_ttfb_ms(profile, rng) for _ in range(4001)]
    assert min(draws) > 0
    assert abs(statistics.median(draws) - profile.ttfb_ms) < 0.1 * profile.ttfb_ms
    assert statistics.mean(draws) > statistics.median(draws)  # a long right tail
