"""The requests of a replay window summed in SQL, per group that decide() treats alike.

What decide()'s choice reads of a request is its model, its rule (the policy it was recorded
under, else the first matching the path), the health of the interval it falls in (Periods,
replay_health.py), and for cost and capped latency the order of the candidates' costs and which
are under the ceiling, which depend on its tokens (for balanced, the exact prompt estimate and
max_tokens). SQLite works all of that out per row and sums the rows into one temp-table row per
group (an integer key, or a text one for what the integer cannot name: an unknown provider, a
first recorded candidate that was excluded, balanced's exact tokens), so no request row goes
through Python. Requests are matched to the health periods by a range join over the periods
temp table in time order (a merge along the ledger's time index), which also sums each
candidate's recorded EWMA at each request's time.
"""

from __future__ import annotations

import math
import queue
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations, product
from pathlib import Path
from typing import Any

import numpy as np

from control_plane.audit import chosen, parse_candidates
from control_plane.ledger.report import read_only
from control_plane.ledger.savings import KINDS
from ext_proc.health_view import DEGRADED_PENALTY
from ext_proc.routing_table import DEFAULT_POLICY, ModelRoute, PolicyRule, RoutingTable
from ext_proc.scoring import (
    BYTES_PER_TOKEN,
    DEFAULT_MAX_TOKENS,
    EXCLUDED_PREFIX,
    NO_OUTPUT_PATHS,
    default_max_tokens,
    estimate_prompt_tokens,
)
from gpu_router.replay_health import Periods, kind_of, union

_SEP = "\x1f"
PARTS = 2
"""Consecutive parts of the window summed at once, each on its own connection and thread."""
_DONE = object()
NOT_ROUTED = -1
"""The group key of the requests that never reached a provider (not re-decided)."""
ROUTED = "routed"
_MARGIN = 1e-9
"""Far above the relative rounding of a cost (a few ulps): prices this far apart order the same
whatever the tokens (see _pair_bit)."""
_PRIME = "(r.request_bytes / :bytes_per_token)"
_WANTED = ("(CASE WHEN r.max_tokens >= 0 THEN r.max_tokens WHEN r.path IN "
           f"({', '.join(f':no_output_{i}' for i in range(len(NO_OUTPUT_PATHS)))}) THEN 0 "
           "ELSE :default_max END)")


@dataclass(frozen=True, slots=True)
class Group:
    """Requests that get one decision and add up in one place."""

    model: str | None
    """Canonical name; None when the policy has no such model."""
    served: str
    """"" when the requests never reached a provider (ROUTED when they did but the model is not
    in the policy: who served them does not matter then)."""
    recorded: str
    """ext_proc's recorded choice (audit.chosen), else who served; a name the table may not
    hold."""
    rule: PolicyRule
    period: int
    """The first period of the interval (Periods of `model`)."""
    decides: tuple[Any, ...]
    """What the decision depends on: equal for groups that get the same one."""
    prompt: int
    """A request's prompt estimate and max_tokens: any of the group decides as all do."""
    wanted: int
    requests: int
    cost: float
    tokens: tuple[float, ...]
    """Sums by KINDS."""
    latency_sums: tuple[float, ...]
    """Per candidate, the sum of its recorded EWMA at each request's time..."""
    latency_counts: tuple[int, ...]
    """...and how many requests that sum has (unmeasured EWMAs are left out)."""


def recorded_choice(candidates: str, provider: str) -> str:
    """ext_proc's recorded choice (audit.chosen); the serving provider when nothing was recorded
    (the SQL of GroupQuery works this out where the first entry is it)."""
    return chosen(parse_candidates(candidates)) or provider


def _cost(route: int, i: int) -> str:
    return f"(({_PRIME} * :in_{route}_{i} + {_WANTED} * :out_{route}_{i}) / 1e6)"


def _pair_bit(a: tuple[float, float], b: tuple[float, float]) -> bool | None:
    """Whether cost(a) <= cost(b) for any tokens, as decide() computes them: True when a's
    prices are both at most b's (rounding is monotonic); False when both are well above b's,
    except with no tokens at all (both costs 0, which the group key's first bit tells apart);
    None: it depends on the tokens, so SQL computes it."""
    if a[0] <= b[0] and a[1] <= b[1]:
        return True
    if a[0] > b[0] * (1 + _MARGIN) and a[1] > b[1] * (1 + _MARGIN):
        return False
    return None


def _token_bits(index: int, route: ModelRoute, code: int, rule: PolicyRule, periods: Periods,
                params: dict[str, Any]) -> list[str]:
    """SQL for what of a request's tokens can change rule's decision besides "no tokens at all":
    each candidate pair's cost order under the degraded flags the window has (both scaled by
    the penalty, a power of two, order as unscaled), and for capped latency which candidates
    are under the ceiling, where the prices alone do not settle it."""
    bits = []
    scale = {False: 1.0, True: DEGRADED_PENALTY}
    exact_scaling = math.frexp(DEGRADED_PENALTY)[0] == 0.5
    flags = periods.degraded_flags
    for i, j in combinations(range(len(route.prices)), 2):
        for di, dj in sorted({(f[i], f[j]) for f in flags}):
            a = tuple(p * scale[di] for p in route.prices[i])
            b = tuple(p * scale[dj] for p in route.prices[j])
            if not exact_scaling or _pair_bit(a, b) is None:  # type: ignore[arg-type]
                bits.append(f"({_cost(index, i)}{' * :penalty' if di else ''} <= "
                            f"{_cost(index, j)}{' * :penalty' if dj else ''})")
    ceiling = rule.cost_ceiling_usd_per_mtok
    if rule.strategy == "latency" and ceiling > 0:
        params[f"ceiling_{code}"] = ceiling
        for i, (low, high) in enumerate(sorted(p) for p in route.prices):
            if high * (1 + _MARGIN) <= ceiling or low > ceiling * (1 + _MARGIN):
                continue  # the same for any tokens but none (the first bit)
            bits.append(f"(CASE WHEN {_PRIME} + {_WANTED} != 0 THEN {_cost(index, i)} * 1e6 / "
                        f"({_PRIME} + {_WANTED}) <= :ceiling_{code} "
                        f"ELSE :in_{index}_{i} <= :ceiling_{code} END)")
    return bits


def _case(selector: str, arms: Sequence[tuple[object, str]], default: str = "NULL") -> str:
    whens = " ".join(f"WHEN {when} THEN {then}" for when, then in arms)
    return f"(CASE {selector} {whens} ELSE {default} END)" if arms else default


class GroupQuery:
    """The temp tables and the statement that sum a window's requests into groups.

    replay_periods: the window cut wherever any model's health period starts, with per model
    an interval id (cut wherever its health_key for any rule but balanced, or its ejections,
    change) and its candidates' EWMAs. replay_combos: every (model name, policy name, provider)
    the table knows -> (model, rule, served) codes and the token class SQL to use, so one index
    lookup per request names them; a request it does not know (a policy or provider the table
    does not name, a balanced rule, an excluded first recorded candidate) gets a text key of its
    raw fields and its period, worked out in Python as the reference does."""

    def __init__(self, table: RoutingTable, periods: dict[str, Periods], until_ms: int) -> None:
        self.table, self.periods, self._until = table, periods, until_ms
        self.models = list(table.models)
        self.rules = list(dict.fromkeys((*table.policies, DEFAULT_POLICY)))
        self._by_name = {rule.name: rule for rule in table.policies}  # the last one wins
        self.params: dict[str, Any] = {
            "bytes_per_token": BYTES_PER_TOKEN, "default_max": DEFAULT_MAX_TOKENS,
            "penalty": DEGRADED_PENALTY, **{f"no_output_{i}": p for i, p in
                                           enumerate(sorted(NO_OUTPUT_PATHS))}}
        self.starts = union([p.starts for p in periods.values()])
        self._firsts: list[np.ndarray] = []
        """Per model, the first period of each of its intervals for every kind but balanced
        (cut where any of those kinds' keys changes); ids are offset model after model."""
        self._offsets = [0]
        ordered = {kind_of(rule): rule for rule in self.rules if rule.strategy != "balanced"}
        for name in self.models:
            cuts = [periods[name].intervals(rule) for rule in ordered.values()]
            self._firsts.append(union(cuts) if cuts else np.zeros(1, dtype=np.intp))
            self._offsets.append(self._offsets[-1] + len(self._firsts[-1]))
        self._balanced: dict[str, np.ndarray] = {}
        """Per model, balanced's interval firsts, for the text keys that need them."""
        self._width = max((len(r.providers) for r in table.models.values()), default=0)
        self._combos, self._tokens = self._combo_rows()
        self.statement = self._statement()

    def _combo_rows(self) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
        """replay_combos' rows, and the distinct token class SQL they point to (-> its bits)."""
        providers, rows = self.table.providers, []
        tokens: dict[str, int] = {}
        index = {name: m for m, name in enumerate(self.models)}
        for m, name in enumerate(self.models):
            route = self.table.models[name]
            for i, (price_in, price_out) in enumerate(route.prices):
                self.params[f"in_{m}_{i}"], self.params[f"out_{m}_{i}"] = price_in, price_out
        aliases: dict[str, list[str]] = {}
        for alias, name in self.table.names.items():
            aliases.setdefault(name, []).append(alias)
        for name, rule in product(self.models, self._by_name.values()):
            m, code = index[name], self.rules.index(rule)
            if rule.strategy == "balanced":
                continue  # exact tokens: the text key
            sql = "0"
            if rule.strategy == "cost" or rule.cost_ceiling_usd_per_mtok > 0:
                bits = [(f"(CASE WHEN r.request_bytes < :bytes_per_token AND {_WANTED} = 0 "
                         "THEN 1 ELSE 0 END)"),
                        *_token_bits(m, self.table.models[name], code, rule,
                                     self.periods[name], self.params)]
                sql = " + ".join(f"{b} * {1 << n}" for n, b in enumerate(bits))
                tokens[sql] = len(bits)
            tokens.setdefault(sql, 0)
            served_codes = (m * len(self.rules) + code) * len(providers)
            rows += [(alias, rule.name, provider, m, list(tokens).index(sql), served_codes + s)
                     for alias in aliases.get(name, ()) for s, provider in enumerate(providers)]
        return rows, tokens

    def _starts_with(self, prefix: str, name: str) -> str:
        """SQL for r.candidates.startswith(prefix), as two comparisons (no substring made)."""
        self.params[f"{name}_low"] = prefix
        self.params[f"{name}_high"] = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        return f"(r.candidates >= :{name}_low AND r.candidates < :{name}_high)"

    def _statement(self) -> str:
        providers, width = self.table.providers, self._width
        bits = max(self._tokens.values(), default=0)
        self._shape = (len(self.models) * len(self.rules) * len(providers), len(providers),
                       1 << bits)
        first = []
        for i, provider in enumerate(providers):  # "provider=value", value scored (not excluded)
            self.params[f"named_{i}"] = f"{provider}="
            unscored = " OR ".join(self._starts_with(f"{provider}={after}", f"p{i}_{n}")
                                   for n, after in enumerate((";", EXCLUDED_PREFIX)))
            first.append((self._starts_with(f"{provider}=", f"p{i}"),
                          (f"(CASE WHEN r.candidates = :named_{i} OR {unscored} THEN NULL "
                          f"ELSE {i} END)")))
        recorded = _case("", [("r.candidates = ''", "c.code % " + str(len(providers))), *first])
        interval = _case("c.m", [(m, f"gp.v_{m}") for m in range(len(self.models))])
        token = _case("c.tokmode", list(enumerate(self._tokens)))  # a CASE picks one lazily
        integer = (f"(({interval} * {self._shape[0]} + c.code) * {self._shape[1]} + {recorded})"
                   f" * {self._shape[2]} + {token}")
        if math.prod(self._shape) * self._offsets[-1] >= 1 << 62:
            integer = "NULL"  # too many groups to number: text keys only
        text = f" || '{_SEP}' || ".join(("gp.start_ms", "r.model", "r.policy", "r.path",
                                         "r.provider", "r.request_bytes", "r.max_tokens",
                                         "r.candidates"))
        key = f"(CASE WHEN r.provider = '' THEN {NOT_ROUTED} ELSE coalesce({integer}, {text}) END)"
        model = "coalesce(c.m, (SELECT m FROM replay_names WHERE name = r.model))"
        latency = [_case(model, [(m, f"gp.l_{m}_{c}") for m, name in enumerate(self.models)
                                 if c < len(self.table.models[name].providers)])
                   for c in range(width)]
        sums = ["n", "cost", *KINDS, *(f"s{c}" for c in range(width))]
        self._create = (f"CREATE TEMP TABLE replay_groups (k PRIMARY KEY, {', '.join(sums)}, "
                        f"{', '.join(f'c{c}' for c in range(width))}, prompt, wanted) "
                        "WITHOUT ROWID")
        values = [key, "1", "r.cost_usd", "r.input_tokens", "r.output_tokens",
                  "r.cached_input_tokens", "r.cache_write_tokens", "r.reasoning_tokens",
                  *latency, *("NULL" for _ in range(width)), _PRIME, _WANTED]
        # c is NULL until a second request joins the group: then the first one's EWMA (still s
        # as inserted, NULL when unmeasured) is counted too (SET reads the row as it was).
        updates = [f"{s} = {s} + excluded.{s}" for s in sums[:7]] + [
            f"c{c} = ifnull(c{c}, s{c} IS NOT NULL) + (excluded.s{c} IS NOT NULL), "
            f"s{c} = ifnull(s{c}, 0.0) + ifnull(excluded.s{c}, 0.0)" for c in range(width)]
        return (f"INSERT INTO replay_groups SELECT {', '.join(values)} FROM replay_periods gp "
                "CROSS JOIN requests r ON r.at_unix_ms >= gp.start_ms AND r.at_unix_ms < "
                "gp.end_ms LEFT JOIN replay_combos c ON c.model = r.model AND c.policy = "
                f"r.policy AND c.provider = r.provider WHERE true ON CONFLICT (k) DO UPDATE SET "
                f"{', '.join(updates)}")

    def _period_index(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per model, its period and interval id at each of replay_periods' starts."""
        found = []
        for name, offset, firsts in zip(self.models, self._offsets, self._firsts, strict=False):
            at = np.searchsorted(self.periods[name].starts, self.starts, side="right") - 1
            found.append((at, np.searchsorted(firsts, at, side="right") - 1 + offset))
        return found

    def _rows(self, index: list[tuple[np.ndarray, np.ndarray]], part: slice,
              chunk: int = 5000) -> Iterator[tuple[object, ...]]:
        """replay_periods' rows in `part`, a chunk at a time (as Python objects, or as columns
        of every model's EWMAs, they would be large): start, end, each model's interval id and
        its candidates' EWMAs."""
        ends = np.append(self.starts[1:], self._until)
        for begin in range(part.start, part.stop, chunk):
            rows = slice(begin, min(begin + chunk, part.stop))
            columns = [self.starts[rows], ends[rows], *(ids[rows] for _, ids in index)]
            for name, (at, _) in zip(self.models, index, strict=True):
                latencies = self.periods[name].latencies[at[rows]]
                columns += [latencies[:, c] for c in range(latencies.shape[1])]
            yield from zip(*(column.tolist() for column in columns), strict=True)

    def _create_tables(self, connection: sqlite3.Connection,
                       index: list[tuple[np.ndarray, np.ndarray]], part: slice) -> None:
        latency = [f"l_{m}_{c}" for m, name in enumerate(self.models)
                   for c in range(len(self.table.models[name].providers))]
        names = ["start_ms INTEGER PRIMARY KEY", "end_ms",
                 *(f"v_{m}" for m in range(len(self.models))), *latency]
        tables = {
            "replay_periods": (f"({', '.join(names)})", len(names),
                               self._rows(index, part)),
            "replay_names": ("(name TEXT PRIMARY KEY, m INTEGER)", 2,
                             [(alias, self.models.index(name))
                              for alias, name in self.table.names.items()]),
            "replay_combos": (("(model, policy, provider, m, tokmode, code, "
                               "PRIMARY KEY (model, policy, provider)) WITHOUT ROWID"), 6,
                              self._combos)}
        for name, (shape, width, rows) in tables.items():
            connection.execute(f"CREATE TEMP TABLE {name} {shape}")
            connection.executemany(f"INSERT INTO {name} VALUES ({', '.join('?' * width)})", rows)
        connection.execute(self._create)

    def _sum_part(self, ledger: Path, index: list[tuple[np.ndarray, np.ndarray]], part: slice,
                  out: queue.Queue[object], stop: threading.Event) -> None:
        """In a thread, on its own connection (its temp tables go with it): sum the requests of
        `part` of the periods and hand the groups' rows over a chunk at a time."""

        def put(item: object) -> None:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        try:
            with read_only(ledger) as connection:
                self._create_tables(connection, index, part)
                connection.execute(self.statement, self.params)
                cursor = connection.execute("SELECT * FROM replay_groups")
                while not stop.is_set() and (rows := cursor.fetchmany(2000)):
                    put(rows)
                cursor.close()
        except BaseException as error:  # noqa: BLE001 (groups() raises it again)
            put(error)
        finally:
            put(_DONE)

    def groups(self, ledger: Path, parts: int = PARTS) -> Iterator[Group]:
        """The window's groups, summed in `parts` consecutive parts of it at once (SQLite runs
        without the GIL, so each takes a core while Python decides the parts already summed): a
        group of one part decides as its twin in another and their sums add up alike."""
        index = self._period_index()
        bounds = np.linspace(0, len(self.starts), parts + 1).astype(int).tolist()
        queues: list[queue.Queue[object]] = [queue.Queue(maxsize=2) for _ in range(parts)]
        stop = threading.Event()
        threads = [threading.Thread(target=self._sum_part, daemon=True,
                                    args=(ledger, index, slice(low, high), out, stop))
                   for low, high, out in zip(bounds, bounds[1:], queues, strict=False)]
        for thread in threads:
            thread.start()
        try:
            for out in queues:
                while (item := out.get()) is not _DONE:
                    if isinstance(item, BaseException):
                        raise item
                    yield from map(self._group, item)  # type: ignore[call-overload]
        finally:
            stop.set()
            for thread in threads:
                thread.join()

    def _balanced_firsts(self, model: str) -> np.ndarray:
        """The first period of each of balanced's intervals of `model` (worked out once)."""
        if model not in self._balanced:
            self._balanced[model] = self.periods[model].intervals(DEFAULT_POLICY)
        return self._balanced[model]

    def _group(self, row: tuple[Any, ...]) -> Group:
        key, requests, cost, *rest = row
        tokens, sums = tuple(rest[:5]), rest[5:5 + self._width]
        counts = rest[5 + self._width:5 + 2 * self._width]
        prompt, wanted = rest[-2:]
        if key == NOT_ROUTED:
            return Group(None, "", "", DEFAULT_POLICY, 0, (), 0, 0, requests, cost, tokens, (), ())
        if isinstance(key, int):
            key, token_class = divmod(key, self._shape[2])
            key, recorded_code = divmod(key, self._shape[1])
            interval, code = divmod(key, self._shape[0])
            code, served_code = divmod(code, len(self.table.providers))
            m, rule_code = divmod(code, len(self.rules))
            model, rule = self.models[m], self.rules[rule_code]
            period = int(self._firsts[m][interval - self._offsets[m]])
            served = self.table.providers[served_code]
            recorded = self.table.providers[recorded_code]
            decides: tuple[Any, ...] = (interval, rule_code, token_class)
        else:
            start, name, policy, path, served, body, asked, candidates = key.split(_SEP, 7)
            route = self.table.resolve(name)
            if route is None:
                return Group(None, ROUTED, "", DEFAULT_POLICY, 0, (), 0, 0, requests, cost,
                             tokens, (), ())
            model = route.name
            rule = self._by_name.get(policy) or self.table.match(path, {}, model)
            prompt, wanted = estimate_prompt_tokens(int(body)), int(asked)
            if wanted < 0:
                wanted = default_max_tokens(path)
            m = self.models.index(model)
            at = int(np.searchsorted(self.periods[model].starts, int(start), "right")) - 1
            firsts = (self._balanced_firsts(model) if rule.strategy == "balanced"
                      else self._firsts[m])
            period = int(firsts[np.searchsorted(firsts, at, "right") - 1])
            recorded = recorded_choice(candidates, served)
            decides = (model, period, self.rules.index(rule), prompt, wanted)
        count = len(self.table.models[model].providers)
        return Group(model, served, recorded, rule, period, decides, prompt,
                     wanted, requests, cost, tokens,
                     tuple(s or 0.0 for s in sums[:count]),
                     tuple(int(s is not None) if n is None else n
                           for s, n in zip(sums[:count], counts[:count], strict=True)))
