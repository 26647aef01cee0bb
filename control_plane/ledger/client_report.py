"""Usage per client from the ledger: `gpu-router report --by client` and `gpu-router keys list`.

A client's spend is the ledger's cost of its requests (failed-over attempts as booked), the
same sum the control plane pushes to ext_proc for budgets (control_plane/client_spend.py).
Rows without a client (no clients declared, or refused before a key matched) are "(none)".
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from control_plane.ledger.report import ReportError, read_only
from control_plane.policy.model import Client
from control_plane.usage.record import is_error_status

NO_CLIENT = "(none)"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientUsage:
    client: str
    requests: int
    spend_usd: float
    input_tokens: int
    output_tokens: int
    errors: int
    """No response, 429 (its own budget and rate-limit refusals included) or 5xx."""
    rate_limited: int
    """429s."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientRow:
    """One client of the policy with its usage over its budget window (or `since`)."""

    usage: ClientUsage
    window_s: int
    budget_usd: float | None
    remaining_usd: float | None
    requests_per_minute: int
    tokens_per_minute: int
    models: tuple[str, ...]
    policy: str | None


Row = tuple[str, int, float, int, int, int]
"""(client, at_unix_ms, cost_usd, status, input_tokens, output_tokens)."""


def ledger_rows(path: Path, since_unix_ms: int) -> list[Row]:
    with read_only(path) as connection:
        try:
            return connection.execute(
                "SELECT client, at_unix_ms, cost_usd, status, input_tokens, output_tokens "
                "FROM requests WHERE at_unix_ms >= ?", (since_unix_ms,)).fetchall()
        except sqlite3.Error as error:
            raise ReportError(f"cannot read the usage ledger {path}: {error}") from error


def usage_of(client: str, rows: Iterable[Row]) -> ClientUsage:
    picked = list(rows)
    return ClientUsage(
        client=client or NO_CLIENT,
        requests=len(picked),
        spend_usd=math.fsum(row[2] for row in picked),
        input_tokens=sum(row[4] for row in picked),
        output_tokens=sum(row[5] for row in picked),
        errors=sum(is_error_status(row[3]) for row in picked),
        rate_limited=sum(row[3] == 429 for row in picked),
    )


def usage_by_client(rows: Sequence[Row]) -> list[ClientUsage]:
    """Every client in `rows`, highest spend first."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row[0], []).append(row)
    usages = [usage_of(name, group) for name, group in groups.items()]
    return sorted(usages, key=lambda usage: (-usage.spend_usd, usage.client))


def client_rows(clients: Sequence[Client], path: Path, now_ms: int,
                default_window_s: int) -> list[ClientRow]:
    """Each declared client with its spend in its budget window (no budget: the default
    window), in policy order."""
    windows = {c.name: c.budget.window_s if c.budget else default_window_s for c in clients}
    oldest = now_ms - max(windows.values(), default=default_window_s) * 1000
    rows = ledger_rows(path, oldest)
    out = []
    for client in clients:
        since = now_ms - windows[client.name] * 1000
        usage = usage_of(client.name, (r for r in rows if r[0] == client.name and r[1] > since))
        budget = client.budget.usd if client.budget else None
        out.append(ClientRow(
            usage=usage, window_s=windows[client.name], budget_usd=budget,
            remaining_usd=None if budget is None else max(budget - usage.spend_usd, 0.0),
            requests_per_minute=client.limits.requests_per_minute,
            tokens_per_minute=client.limits.tokens_per_minute,
            models=client.models, policy=client.policy))
    return out


def duration_text(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """First column left-aligned, the rest right-aligned."""
    every = [tuple(headers), *(tuple(row) for row in rows)]
    widths = [max(len(row[i]) for row in every) for i in range(len(headers))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                         for i, cell in enumerate(row)).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(every[0]), rule, *(line(row) for row in every[1:])])


def render_usage(usages: Sequence[ClientUsage], title: str) -> str:
    headers = ("client", "requests", "spend USD", "input tokens", "output tokens", "errors",
               "429s")
    rows = [(u.client, str(u.requests), f"{u.spend_usd:.6f}", str(u.input_tokens),
             str(u.output_tokens), str(u.errors), str(u.rate_limited)) for u in usages]
    body = table(headers, rows) if rows else "(no requests in this window)"
    return f"{title}\n\n{body}\n\nerrors = no response, 429 or 5xx (a client's own budget and " \
           "rate-limit refusals are 429s)"


def render_clients(rows: Sequence[ClientRow]) -> str:
    headers = ("client", "budget USD", "window", "spent USD", "remaining USD", "requests",
               "req/min", "tokens/min", "models", "policy")
    cells = [(r.usage.client, "-" if r.budget_usd is None else f"{r.budget_usd:g}",
              duration_text(r.window_s), f"{r.usage.spend_usd:.6f}",
              "-" if r.remaining_usd is None else f"{r.remaining_usd:.6f}",
              str(r.usage.requests), str(r.requests_per_minute or "-"),
              str(r.tokens_per_minute or "-"), ",".join(r.models) or "*", r.policy or "-")
             for r in rows]
    return table(headers, cells) if cells else "(no clients declared: the edge is open)"


def to_json(items: Sequence[ClientUsage | ClientRow]) -> str:
    document: list[dict[str, Any]] = [asdict(item) for item in items]
    return json.dumps(document, indent=2)
