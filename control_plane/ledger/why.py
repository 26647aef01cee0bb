"""`gpu-router why REQUEST_ID` and GET /v1/why/<id>: one request's routing story.

Everything comes from the ledger's database, so it outlives the audit log's rotation: the
request's row (policy, strategy, reason, ext_proc's candidates in rank order with each score or
exclusion, the fallback order, attempts, status, tokens and cost) and the health history row
of every candidate current at the request's start (its EWMA latency, error and 429 rates,
state). Prices and the tokens' cost on each candidate come from the policy given (the one
being served). Each attempt is told with its real outcome: the failed ones from the attempts
table (the edges' attempt log, attempts.py), in the order they started, the last from the
request's row. A request with no attempt rows (booked by an older ledger, or its attempts lost
with the control plane) has them inferred from the route's order instead, and says so: Envoy
walks the winner, then the fallbacks, so with n attempts the first n - 1 failed.
The id is the edge's request id or, failing that (CLI only), the id the client sent.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from control_plane.audit import chosen, parse_candidates
from control_plane.ledger.attempts import AttemptRow, attempts_of
from control_plane.ledger.health_history import HealthRow, rows_at
from control_plane.ledger.report import read_only
from control_plane.ledger.savings import offerings, price_tokens
from control_plane.ledger.store import SELECT_ROW, LedgerRow, row_from_columns
from control_plane.policy.model import RoutingConfig


class UnknownRequestError(LookupError):
    """No ledger row has this request id (or client request id)."""


def _find(connection: sqlite3.Connection, request_id: str, client_ids: bool) -> LedgerRow:
    for column in ("request_id", "client_request_id")[:2 if client_ids else 1]:
        values = connection.execute(
            f"{SELECT_ROW} WHERE {column} = ? ORDER BY at_unix_ms DESC LIMIT 1",
            (request_id,)).fetchone()
        if values is not None:
            return row_from_columns(values)
    raise UnknownRequestError(f"no request {request_id!r} in the ledger")


def _health(rows: list[HealthRow], provider: str, model: str) -> dict[str, Any] | None:
    """The model's row on that provider, the provider-wide one filling in what it lacks (the
    same fallback ext_proc uses for latency; either one ejects)."""
    keyed = {(row.provider, row.model): row for row in rows}
    own, wide = keyed.get((provider, model)), keyed.get((provider, ""))
    if own is None and wide is None:
        return None
    main = own or wide
    assert main is not None
    ejected = [row for row in (own, wide) if row is not None and row.state == "ejected"]
    return {
        "recorded_at": datetime.fromtimestamp(main.at_unix_ms / 1000, UTC).isoformat(),
        "ewma_ms": main.ewma_ms if main.ewma_ms is not None else (wide and wide.ewma_ms),
        "ttfb_ms": main.ttfb_ms,
        "error_rate": main.error_rate,
        "rate_429": main.rate_429,
        "state": ejected[0].state if ejected else main.state,
        "ejected_until": max((row.ejected_until for row in ejected), default=0) or None,
        "reason": ejected[0].reason if ejected else main.reason,
    }


def _attempt(number: int, provider: str, outcome: str, status: int | None = None,
             flags: str = "", duration_ms: float | None = None) -> dict[str, Any]:
    return {"attempt": number, "provider": provider, "outcome": outcome, "status": status,
            "flags": [flag for flag in flags.split(",") if flag], "duration_ms": duration_ms}


def _told(row: LedgerRow, failed: list[AttemptRow]) -> list[dict[str, Any]]:
    """The logged failed attempts, then the last one. The log has every attempt with a status
    of 400 or more, so the last attempt is logged exactly when the client got one from its
    provider; otherwise it is the one that answered, told from the request's row. Attempts the
    log lost (an ALS batch in flight when the control plane stopped) are listed as such."""
    final = failed[-1] if row.status >= 400 and failed[-1].provider == row.provider else None
    retried = failed[:-1] if final is not None else failed
    last = max(row.attempts, len(retried) + 1)
    told = [_attempt(number, a.provider, f"{a.outcome()}: retried on the next", a.status,
                     a.flags, a.duration_ms)
            for number, a in enumerate(retried, start=1)]
    told += [_attempt(number, "", "failed: not in the attempt log")
             for number in range(len(retried) + 1, last)]
    told.append(_attempt(last, row.provider, f"answered {row.status}", row.status)
                if final is None else
                _attempt(last, final.provider, f"{final.outcome()}: the client got {row.status}",
                         final.status, final.flags, final.duration_ms))
    return told


def _inferred(row: LedgerRow, order: list[str]) -> list[dict[str, Any]]:
    """From the route's order: the first n - 1 of n attempts failed, the n-th answered."""
    return [_attempt(i + 1, provider, "failed: retried on the next") if i + 1 < row.attempts
            else _attempt(i + 1, provider, f"answered {row.status}", row.status)
            for i, provider in enumerate(order[:row.attempts])]


def explain(db_path: str | Path, config: RoutingConfig, request_id: str, *,
            client_ids: bool = True) -> dict[str, Any]:
    """The story of one request as a JSON-ready dict; UnknownRequestError when absent.
    `client_ids`: also look the id up among the ids clients sent (not indexed: a scan, which
    the control plane's event loop does not afford)."""
    with read_only(Path(db_path)) as connection:
        row = _find(connection, request_id, client_ids)
        history = rows_at(connection, row.at_unix_ms)
        failed = attempts_of(connection, row.request_id)
    tokens = (row.input_tokens, row.output_tokens, row.cached_input_tokens,
              row.cache_write_tokens, row.reasoning_tokens)
    prices = offerings(config).get(row.model, {})
    candidates = []
    for rank, candidate in enumerate(parse_candidates(row.candidates), start=1):
        price = prices.get(candidate["provider"])
        candidates.append({
            "rank": rank, **candidate,
            "price_usd_per_mtok": None if price is None else {
                "input": price.input, "output": price.output},
            "cost_of_its_tokens_usd": None if price is None else price_tokens(tokens, price),
            "health": _health(history, candidate["provider"], row.model),
        })
    choice = chosen(candidates)
    order = [p for p in (choice, *row.fallbacks.split(",")) if p]
    attempts = _told(row, failed) if failed else _inferred(row, order)
    story = {k: v for k, v in asdict(row).items() if k not in ("candidates", "fallbacks")}
    story.update({
        "at": datetime.fromtimestamp(row.at_unix_ms / 1000, UTC).isoformat(
            timespec="milliseconds"),
        "routed": bool(row.provider),
        "choice": choice,
        "fallbacks": [p for p in row.fallbacks.split(",") if p],
        "candidates": candidates,
        "attempts_detail": attempts,
        "attempts_inferred": bool(attempts) and not failed,
        "failed_over": bool(row.provider) and row.provider != choice,
        "reported_tokens": json.loads(row.reported_tokens or "{}"),
    })
    return story


def render_why(story: dict[str, Any]) -> str:
    """The terminal form of explain()'s dict."""
    lines = [f"request {story['request_id']} at {story['at']}"
             + (f" (client id {story['client_request_id']})" if story["client_request_id"]
                else ""),
             (f"  {story['path'] or '-'} model {story['model'] or '-'}, client "
              f"{story['client'] or '-'}"),
             (f"  policy {story['policy'] or '-'}, strategy {story['strategy'] or '-'}: "
              f"{story['reason'] or 'ext_proc did not decide'}")]
    if not story["routed"]:
        lines.append(f"  never reached a provider: answered {story['status']} at the edge")
    if story["candidates"]:
        lines += ["", "  candidates (rank order):"]
    for c in story["candidates"]:
        price = c["price_usd_per_mtok"]
        health = c["health"]
        verdict = (f"score {c['score']:.6g}" if "score" in c
                   else f"excluded: {c.get('excluded', c.get('unparsed'))}")
        lines.append(f"   {c['rank']}. {c['provider']:<12} {verdict}")
        details = []
        if price is not None:
            details.append(f"${price['input']:g}/${price['output']:g} per 1M in/out, these "
                           f"tokens ${c['cost_of_its_tokens_usd']:.6f}")
        if health is None:
            details.append("no health recorded yet")
        else:
            ewma = "unmeasured" if health["ewma_ms"] is None else f"{health['ewma_ms']:.0f} ms"
            details.append(f"EWMA {ewma}, errors {health['error_rate']:.0%}, 429s "
                           f"{health['rate_429']:.0%}, {health['state']}"
                           + (f" ({health['reason']})" if health["reason"] else ""))
        lines += [f"      {detail}" for detail in details]
    if story["attempts_detail"]:
        lines += ["", "  attempts" + (" (inferred from the route order: no attempt logged):"
                                      if story["attempts_inferred"] else ":")]
        lines += [f"   {a['attempt']}. {a['provider']:<12} {a['outcome']}"
                  for a in story["attempts_detail"]]
    lines += ["", (f"  served by {story['provider'] or 'nobody'}: status {story['status']}, "
                   f"ttfb {story['ttfb_ms']:.0f} ms, total {story['total_ms']:.0f} ms"),
              f"  tokens in {story['input_tokens']} (cached {story['cached_input_tokens']}), "
              f"out {story['output_tokens']}"
              + (f", estimated: {story['estimate_reason']}" if story["estimated"] else "")
              + f"; cost ${story['cost_usd']:.8f}"]
    return "\n".join(lines)
