"""How each simulated provider behaves when healthy: latency shape and usage-reporting dialect.

The built-in table gives the default policy's four clouds distinct personalities, so the router's
latency-first and cost-first strategies have something real to tell apart.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass


class UsageFormat(enum.Enum):
    """How a provider reports token usage in its responses."""

    OPENAI = "openai"
    """usage: {prompt_tokens, completion_tokens, total_tokens}"""
    ANTHROPIC = "anthropic"
    """usage: {input_tokens, output_tokens}"""
    NONE = "none"
    """No usage at all, not even when a stream asks for it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SimProfile:
    ttfb_ms: float
    """Median time to first byte (first token when streaming)."""
    ttfb_jitter_ms: float = 0.0
    """Spread of the lognormal TTFB, roughly its standard deviation; 0 means constant."""
    ms_per_token: float = 0.0
    """Time per completion token (per chunk after the first when streaming)."""
    usage_format: UsageFormat = UsageFormat.OPENAI


GENERIC_PROFILE = SimProfile(ttfb_ms=20.0, ttfb_jitter_ms=5.0, ms_per_token=1.0)

BUILTIN_PROFILES: dict[str, SimProfile] = {
    # H100 / A100-80GB on demand.
    "lambda": SimProfile(ttfb_ms=40.0, ttfb_jitter_ms=8.0, ms_per_token=2.0),
    # H100 reserved, warm.
    "coreweave": SimProfile(ttfb_ms=25.0, ttfb_jitter_ms=4.0, ms_per_token=1.5),
    # RTX-4090 / L40S marketplace: jittery, reports no usage.
    "vast": SimProfile(
        ttfb_ms=120.0, ttfb_jitter_ms=80.0, ms_per_token=4.0, usage_format=UsageFormat.NONE
    ),
    # L40S / A100-80GB: reports usage as input/output tokens.
    "runpod": SimProfile(
        ttfb_ms=60.0, ttfb_jitter_ms=15.0, ms_per_token=3.0, usage_format=UsageFormat.ANTHROPIC
    ),
}


def profile_for(provider: str) -> SimProfile:
    """The built-in profile of a provider name, or the generic one."""
    return BUILTIN_PROFILES.get(provider, GENERIC_PROFILE)


def sample_ttfb_ms(profile: SimProfile, rng: random.Random) -> float:
    """One TTFB draw: lognormal with median `ttfb_ms`, so the tail is long and never negative."""
    if profile.ttfb_jitter_ms <= 0 or profile.ttfb_ms <= 0:
        return max(profile.ttfb_ms, 0.0)
    sigma = profile.ttfb_jitter_ms / profile.ttfb_ms
    return profile.ttfb_ms * math.exp(rng.gauss(0.0, sigma))
