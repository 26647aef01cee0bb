"""Cost of one request from its normalised usage and the serving offering's price sheet.

Each of Usage's disjoint counts is priced once at its own rate (see normalise.py).
A count the sheet has no price for raises MissingPriceError instead of being billed
at a guessed rate; policy validation makes that impossible for a provider's own
usage format, so it signals a record priced against the wrong sheet.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from control_plane.policy.model import Price, RoutingConfig
from control_plane.usage.normalise import Usage

TOKENS_PER_PRICE_UNIT = 1_000_000
"""Prices are USD per 1M tokens."""


class MissingPriceError(LookupError):
    """Usage has tokens of a kind the price sheet does not list."""


def cost_usd(usage: Usage, price: Price) -> float:
    """USD for `usage` at `price`; MissingPriceError for tokens without a listed price."""
    components = (
        ("input", usage.input_tokens, price.input),
        ("output", usage.output_tokens, price.output),
        ("cached_input", usage.cached_input_tokens, price.cached_input),
        ("cache_write", usage.cache_write_tokens, price.cache_write),
        ("reasoning", usage.reasoning_tokens, price.reasoning),
    )
    total = 0.0
    for name, tokens, rate in components:
        if not tokens:
            continue
        if rate is None:
            raise MissingPriceError(f"{tokens} {name} tokens but the price sheet lists no "
                                    f"'{name}' price")
        total += tokens * rate
    return total / TOKENS_PER_PRICE_UNIT


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceBook:
    """Price sheets and usage formats of one policy, indexed once per policy version."""

    prices: Mapping[tuple[str, str], Price]
    """(provider, canonical model) -> the offering's price sheet."""
    usage_formats: Mapping[str, str]
    """Provider -> its usage_format value ("openai" | "anthropic" | "none")."""

    @classmethod
    def from_config(cls, config: RoutingConfig) -> PriceBook:
        return cls(
            prices={(provider.name, offering.model): offering.price
                    for provider in config.providers for offering in provider.offerings},
            usage_formats={provider.name: provider.usage_format.value
                           for provider in config.providers},
        )

    def price(self, provider: str, model: str) -> Price | None:
        """None when the policy has no such offering (e.g. nobody served the request)."""
        return self.prices.get((provider, model))

    def usage_format(self, provider: str) -> str:
        """"none" for a provider the policy does not know: nothing to read, so estimate."""
        return self.usage_formats.get(provider, "none")
