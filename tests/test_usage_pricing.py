"""Cost per request: every component priced once at its own rate; no silent defaults."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from control_plane.policy.load import default_policy_path, load_policy_file
from control_plane.policy.model import Price
from control_plane.usage.normalise import Usage
from control_plane.usage.pricing import MissingPriceError, PriceBook, cost_usd

ZERO = Usage(input_tokens=0, output_tokens=0, cached_input_tokens=0, cache_write_tokens=0,
             reasoning_tokens=0, estimated=False)


def usage(**counts: Any) -> Usage:
    return replace(ZERO, **counts)


FULL = Price(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75, reasoning=12.0)


def test_every_component_is_priced_per_million_tokens() -> None:
    counts = usage(input_tokens=1000, output_tokens=200, cached_input_tokens=10_000,
                   cache_write_tokens=2000, reasoning_tokens=500)
    expected = (1000 * 3.0 + 200 * 15.0 + 10_000 * 0.3 + 2000 * 3.75 + 500 * 12.0) / 1e6
    assert cost_usd(counts, FULL) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("field", "price"), [
    ("input_tokens", 3.0), ("output_tokens", 15.0), ("cached_input_tokens", 0.3),
    ("cache_write_tokens", 3.75), ("reasoning_tokens", 12.0)])
def test_each_component_alone(field: str, price: float) -> None:
    assert cost_usd(usage(**{field: 1_000_000}), FULL) == pytest.approx(price)


def test_zero_usage_costs_nothing_even_without_optional_prices() -> None:
    assert cost_usd(usage(), Price(input=1.0, output=1.0)) == 0.0


@pytest.mark.parametrize("field", ["cached_input_tokens", "cache_write_tokens",
                                   "reasoning_tokens"])
def test_tokens_without_a_listed_price_raise(field: str) -> None:
    with pytest.raises(MissingPriceError, match="lists no"):
        cost_usd(usage(input_tokens=5, **{field: 7}), Price(input=1.0, output=1.0))


def test_price_book_from_the_default_policy() -> None:
    book = PriceBook.from_config(load_policy_file(default_policy_path()))
    assert book.usage_format("runpod") == "anthropic"
    assert book.usage_format("vast") == "none"
    assert book.usage_format("lambda") == book.usage_format("coreweave") == "openai"
    assert book.usage_format("unknown-provider") == "none"
    runpod = book.price("runpod", "llama-3.1-8b")
    assert runpod is not None and runpod.cache_write == 0.125
    assert book.price("coreweave", "mixtral-8x7b") is None
    assert book.price("", "llama-3.1-8b") is None


def test_default_policy_prices_every_token_its_providers_report() -> None:
    config = load_policy_file(default_policy_path())
    reportable = {"openai": ("cached_input", "reasoning"),
                  "anthropic": ("cached_input", "cache_write"), "none": ()}
    for provider in config.providers:
        for offering in provider.offerings:
            for key in reportable[provider.usage_format.value]:
                assert getattr(offering.price, key) is not None, (provider.name, key)
