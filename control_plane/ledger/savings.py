"""`gpu-router savings`: what the routed traffic cost against single-provider baselines.

The ledger's rows are summed per (model, provider) with their tokens by kind (from its hourly
rollups, rollup.py, and the rows of the window's first partial hour), so
"the same tokens on provider X" is sum(tokens of a kind) x X's price for that kind: a handful
of rows reach Python whatever the window. A provider "could have served" a model when the
policy lists an offering of it on a GPU that holds it. Tokens of a kind X's sheet has no price
for are billed at X's nearest rate (cached input and cache writes at its input price,
reasoning at its output price): X would not have given the discount.

Baselines: per model, every provider that could serve it, the cheapest of them, and the one
that served most of that model. In total: each single provider over the models it could serve
(the rest is listed apart with what it actually cost, never priced at zero), and the sums of
the per-model cheapest and most-used baselines. Failover: requests that needed more than one
attempt and the extra attempts; failed attempts return no usage, so the ledger books none of
them (paid = what the ledger booked beyond the served attempt: nothing).
Requests that never reached a provider are counted apart.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from control_plane.ledger.client_report import table
from control_plane.ledger.report import ReportError, parse_window, read_only, window_start
from control_plane.ledger.rollup import window_sums
from control_plane.policy.model import Price, RoutingConfig
from control_plane.usage.pricing import TOKENS_PER_PRICE_UNIT

KINDS = ("input", "output", "cached_input", "cache_write", "reasoning")


@dataclass(frozen=True, slots=True, kw_only=True)
class Served:
    """One (model, provider) group of the ledger."""

    model: str
    provider: str
    requests: int
    tokens: tuple[float, ...]
    """Summed tokens by KINDS."""
    cost_usd: float
    failed_over: int
    extra_attempts: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Baseline:
    provider: str
    cost_usd: float
    savings_usd: float
    """Baseline minus actual: positive when routing was cheaper."""
    savings_pct: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSavings:
    model: str
    requests: int
    actual_usd: float
    served_by: dict[str, int]
    """Provider -> requests it served."""
    baselines: tuple[Baseline, ...]
    """Every provider that could have served the model, cheapest first."""
    cheapest: Baseline | None
    most_used: Baseline | None
    """The provider that served most of this model's requests."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Uncovered:
    model: str
    requests: int
    actual_usd: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SingleProvider:
    """Everything on one provider: what it could serve, priced; the rest apart."""

    provider: str
    covered_requests: int
    actual_usd: float
    """What the covered requests actually cost."""
    baseline: Baseline
    uncovered: tuple[Uncovered, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Savings:
    since: datetime
    until: datetime
    requests: int
    actual_usd: float
    models: tuple[ModelSavings, ...]
    providers: tuple[SingleProvider, ...]
    """Cheapest baseline first."""
    vs_cheapest: Baseline | None
    """Sum over models of each model's cheapest provider."""
    vs_most_used: Baseline | None
    """Sum over models of each model's most-used provider."""
    unpriced: tuple[Uncovered, ...]
    """Models no provider of the policy offers any more."""
    failed_over: int
    extra_attempts: int
    failover_paid_usd: float
    unrouted: int
    """Requests that never reached a provider."""


def price_tokens(tokens: tuple[float, ...], price: Price) -> float:
    """USD for summed tokens by KINDS at `price`, unlisted kinds at the nearest listed rate."""
    rates = (price.input, price.output,
             price.input if price.cached_input is None else price.cached_input,
             price.input if price.cache_write is None else price.cache_write,
             price.output if price.reasoning is None else price.reasoning)
    return math.fsum(n * rate for n, rate in zip(tokens, rates, strict=True)) / (
        TOKENS_PER_PRICE_UNIT)


def offerings(config: RoutingConfig) -> dict[str, dict[str, Price]]:
    """Model -> {provider -> price} for every offering on a GPU that holds the model."""
    models = {model.name: model for model in config.models}
    found: dict[str, dict[str, Price]] = {}
    for provider in config.providers:
        gpus = {gpu.type: gpu for gpu in provider.gpus}
        for offering in provider.offerings:
            model = models.get(offering.model)
            gpu = gpus.get(offering.gpu)
            if model is not None and gpu is not None and model.fits(gpu):
                found.setdefault(offering.model, {})[provider.name] = offering.price
    return found


def _baseline(provider: str, cost: float, actual: float) -> Baseline:
    return Baseline(provider=provider, cost_usd=cost, savings_usd=cost - actual,
                    savings_pct=(cost - actual) / cost if cost else None)


def _summed(groups: list[Served]) -> tuple[float, ...]:
    return tuple(math.fsum(g.tokens[i] for g in groups) for i in range(len(KINDS)))


def _model(model: str, groups: list[Served], prices: Mapping[str, Price]) -> ModelSavings:
    actual = math.fsum(g.cost_usd for g in groups)
    tokens = _summed(groups)
    served_by = {g.provider: g.requests for g in sorted(groups, key=lambda g: -g.requests)}
    baselines = sorted((_baseline(name, price_tokens(tokens, price), actual)
                        for name, price in prices.items()), key=lambda b: (b.cost_usd, b.provider))
    top = next(iter(served_by))
    return ModelSavings(
        model=model, requests=sum(served_by.values()), actual_usd=actual, served_by=served_by,
        baselines=tuple(baselines), cheapest=baselines[0] if baselines else None,
        most_used=next((b for b in baselines if b.provider == top), None))


def compute_savings(groups: list[Served], config: RoutingConfig, unrouted: int,
                    since: datetime, until: datetime) -> Savings:
    """Pure: the savings of ledger groups under the policy's price sheets."""
    fit = offerings(config)
    by_model: dict[str, list[Served]] = {}
    for group in groups:
        by_model.setdefault(group.model, []).append(group)
    models = tuple(_model(name, rows, fit[name])
                   for name, rows in sorted(by_model.items()) if fit.get(name))
    unpriced = tuple(Uncovered(model=name, requests=sum(g.requests for g in rows),
                               actual_usd=math.fsum(g.cost_usd for g in rows))
                     for name, rows in sorted(by_model.items()) if not fit.get(name))
    singles = []
    for provider in dict.fromkeys(p.name for p in config.providers):
        covered = [m for m in models if any(b.provider == provider for b in m.baselines)]
        if not covered:
            continue
        actual = math.fsum(m.actual_usd for m in covered)
        cost = math.fsum(b.cost_usd for m in covered for b in m.baselines if b.provider == provider)
        singles.append(SingleProvider(
            provider=provider, covered_requests=sum(m.requests for m in covered),
            actual_usd=actual, baseline=_baseline(provider, cost, actual),
            uncovered=tuple(Uncovered(model=m.model, requests=m.requests, actual_usd=m.actual_usd)
                            for m in models if m not in covered) + unpriced))
    actual = math.fsum(g.cost_usd for g in groups)
    priced = math.fsum(m.actual_usd for m in models)

    def total(pick: str) -> Baseline | None:
        chosen = [getattr(m, pick) for m in models]
        if not models or None in chosen:
            return None
        return _baseline("per model", math.fsum(b.cost_usd for b in chosen), priced)

    return Savings(
        since=since, until=until, requests=sum(g.requests for g in groups), actual_usd=actual,
        models=models, providers=tuple(sorted(singles, key=lambda s: s.baseline.cost_usd)),
        vs_cheapest=total("cheapest"), vs_most_used=total("most_used"), unpriced=unpriced,
        failed_over=sum(g.failed_over for g in groups),
        extra_attempts=sum(g.extra_attempts for g in groups), failover_paid_usd=0.0,
        unrouted=unrouted)


def build_savings(db_path: str | Path, config: RoutingConfig, since: timedelta,
                  now: datetime) -> Savings:
    start = window_start(now, since)
    since_ms = int(start.timestamp() * 1000)
    with read_only(Path(db_path)) as connection:
        try:
            sums = window_sums(connection, since_ms, ("model", "provider"))
        except sqlite3.Error as error:
            raise ReportError(f"cannot read the usage ledger {db_path}: {error}") from error
    groups = [Served(model=model, provider=provider, requests=n, tokens=tuple(tokens),
                     cost_usd=cost, failed_over=failed_over, extra_attempts=extra)
              for model, provider, n, cost, _, *tokens, failed_over, extra in sums if provider]
    unrouted = sum(row[2] for row in sums if not row[1])
    return compute_savings(groups, config, unrouted, start, now)


# --- rendering ---------------------------------------------------------------------------

def _pct(baseline: Baseline | None) -> str:
    if baseline is None or baseline.savings_pct is None:
        return "-"
    return f"{baseline.savings_pct:.1%}"


def render_savings(savings: Savings) -> str:
    since, until = (moment.astimezone(UTC) for moment in (savings.since, savings.until))
    lines = [f"gpu-router savings {since:%Y-%m-%d %H:%M:%S} .. {until:%Y-%m-%d %H:%M:%S} UTC",
             "", f"served: {savings.requests} requests, ${savings.actual_usd:.6f}"]
    for name, baseline in (("cheapest single provider per model", savings.vs_cheapest),
                           ("most-used provider per model", savings.vs_most_used)):
        if baseline is not None:
            lines.append(f"vs {name}: ${baseline.cost_usd:.6f}, saved "
                         f"${baseline.savings_usd:.6f} ({_pct(baseline)})")
    rows = []
    for model in savings.models:
        for baseline in model.baselines:
            tags = [tag for tag, pick in (("cheapest", model.cheapest), ("most used",
                    model.most_used)) if pick is not None and pick.provider == baseline.provider]
            rows.append((model.model, str(model.requests), f"{model.actual_usd:.6f}",
                         baseline.provider + (f" ({', '.join(tags)})" if tags else ""),
                         f"{baseline.cost_usd:.6f}", f"{baseline.savings_usd:.6f}",
                         _pct(baseline)))
    if rows:
        lines += ["", table(("model", "requests", "actual USD", "all on", "would cost USD",
                             "saved USD", "saved"), rows)]
    singles = [(s.provider, str(s.covered_requests), f"{s.actual_usd:.6f}",
                f"{s.baseline.cost_usd:.6f}", f"{s.baseline.savings_usd:.6f}", _pct(s.baseline),
                ", ".join(f"{u.model} ({u.requests} req, ${u.actual_usd:.6f})"
                          for u in s.uncovered) or "-") for s in savings.providers]
    if singles:
        lines += ["", table(("everything on", "requests", "actual USD", "would cost USD",
                             "saved USD", "saved", "could not serve (actual cost)"), singles)]
    lines += ["", (f"failover: {savings.failed_over} requests failed over "
                   f"({savings.extra_attempts} extra attempts, ${savings.failover_paid_usd:.6f} "
                   "paid: failed attempts return no usage)"),
              f"not routed (never reached a provider): {savings.unrouted} requests"]
    if savings.unpriced:
        lines.append("no price in this policy: " + ", ".join(
            f"{u.model} ({u.requests} req)" for u in savings.unpriced))
    return "\n".join(lines)


def to_json(savings: Savings) -> dict[str, Any]:
    data = asdict(savings)
    data["since"], data["until"] = savings.since.isoformat(), savings.until.isoformat()
    return data


def run_savings(db_path: str | Path, config: RoutingConfig, since_text: str, fmt: str, *,
                now: datetime | None = None) -> str:
    """What `gpu-router savings` prints; ReportError for a bad window or a missing ledger."""
    if fmt not in ("table", "json"):
        raise ReportError(f"unknown format {fmt!r}; one of: table, json")
    savings = build_savings(db_path, config, parse_window(since_text), now or datetime.now(UTC))
    return json.dumps(to_json(savings), indent=2) if fmt == "json" else render_savings(savings)
