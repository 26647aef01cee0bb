"""`gpu-router health`: the control plane's fleet health as a terminal table."""

from __future__ import annotations

from typing import Any

COLUMNS = ("provider", "model", "state", "until", "ewma ms", "ttfb ms", "samples", "errors", "429s", "in flight",
           "weight")


def _row(provider: str, model: str, view: dict[str, Any], weight: str) -> tuple[str, ...]:
    until = view.get("cooldown_until") or ""
    return (
        provider,
        model or "*",
        view["state"],
        until[11:19] if until else "-",
        f"{view['ewma_latency_ms']:.0f}" if view.get("latency_samples") else "-",
        f"{view['ewma_ttfb_ms']:.0f}" if view.get("latency_samples") else "-",
        str(view["samples"]),
        f"{view['error_rate']:.0%}",
        f"{view['rate_429']:.0%}",
        str(view["in_flight"]) if "in_flight" in view else "-",
        weight or "-",
    )


def render_health(health: dict[str, Any]) -> str:
    """One row per provider (model "*") and per provider and model; requests in flight are
    known per provider only."""
    weights = health.get("weights") or {}
    rows = [COLUMNS]
    for provider, view in sorted(health["providers"].items()):
        rows.append(_row(provider, "", view, str(weights.get(provider, ""))))
        for model, model_view in sorted(view.get("models", {}).items()):
            rows.append(_row(provider, model, model_view, ""))
    if len(rows) == 1:
        return f"no traffic seen yet (health version {health.get('version')})"
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return "\n".join(lines)
