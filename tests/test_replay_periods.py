"""replay_health.Periods aligns every health period at once with numpy and cuts the window into
intervals where health_key or the ejections change; on random histories (unmeasured EWMAs,
provider-wide rows, degraded and ejected states with and without cooldowns, rows before the
window and beyond the lookback) it must say what the per-period reference says:
aligned_health over the rows current then, health_key, ejected_at."""

from __future__ import annotations

import math
import sqlite3

from hypothesis import given, settings
from hypothesis import strategies as st
from replay_reference import ejected_at

from control_plane.ledger.health_history import (
    HISTORY_INSERT,
    HISTORY_SCHEMA,
    LOOKBACK_MS,
    HealthRow,
    rows_at,
    stream_rows,
)
from control_plane.policy.load import default_policy_path, load_policy_file
from control_plane.policy.wire import to_routing_policy
from ext_proc.routing_table import DEFAULT_POLICY, build_routing_table
from gpu_router.replay_health import aligned_health, health_key, read_periods

TABLE = build_routing_table(to_routing_policy(load_policy_file(default_policy_path())))
SINCE, UNTIL = 10_000_000, 10_000_200
KEYS = [(p, m) for p in TABLE.providers for m in ("", "llama-3.1-8b", "mixtral-8x7b")]
RULES = [*TABLE.policies, DEFAULT_POLICY]

rows = st.lists(st.tuples(
    st.sampled_from(KEYS),
    st.sampled_from([SINCE - LOOKBACK_MS - 5, SINCE - 40, SINCE, *range(SINCE + 1, UNTIL, 9)]),
    st.sampled_from([None, 0.0, 50.0, 100.0, 100.0 / 3, 25.0, 2500.0]),
    st.sampled_from(["healthy", "degraded", "ejected"]),
    st.sampled_from([0, SINCE + 3, SINCE + 50, SINCE + 51, UNTIL + 10])), max_size=60)


def ledger(history: list[tuple]) -> sqlite3.Connection:
    connection = sqlite3.connect(":memory:")
    for statement in HISTORY_SCHEMA:
        connection.execute(statement)
    connection.executemany(HISTORY_INSERT, [
        HealthRow(at_unix_ms=at, provider=provider, model=model, ttfb_ms=None, ewma_ms=ewma,
                  error_rate=0.0, rate_429=0.0, state=state,
                  ejected_until=until if state == "ejected" else 0, reason="").values()
        for (provider, model), at, ewma, state, until in history])
    return connection


@settings(max_examples=150, deadline=None)
@given(rows)
def test_periods_align_and_cut_as_the_reference_does(history: list[tuple]) -> None:
    connection = ledger(history)
    periods = read_periods(connection, TABLE, SINCE, UNTIL)
    current = {(r.provider, r.model): (r.ewma_ms, r.state, r.ejected_until)
               for r in rows_at(connection, SINCE)}
    later = list(stream_rows(connection, SINCE, UNTIL))
    for name in ("llama-3.1-8b", "mixtral-8x7b"):
        route, mine = TABLE.models[name], periods[name]
        state = dict(current)
        pending = iter(later)
        upcoming = next(pending, None)
        theirs = []
        for period, start in enumerate(mine.starts.tolist()):
            while upcoming is not None and upcoming.at_unix_ms <= start:
                state[upcoming.provider, upcoming.model] = (
                    upcoming.ewma_ms, upcoming.state, upcoming.ejected_until)
                upcoming = next(pending, None)
            reference, aligned = aligned_health(route, state), mine.aligned(period)
            assert [math.isnan(v) or v for v in aligned.latencies] == [
                math.isnan(v) or v for v in reference.latencies]
            assert (aligned.degraded_flags, aligned.ejected_until, aligned.any_ejected) == (
                reference.degraded_flags, reference.ejected_until, reference.any_ejected)
            end = (mine.starts[period + 1] if period + 1 < len(mine.starts) else UNTIL) - 1
            assert ejected_at(reference, start) == ejected_at(reference, end) == tuple(
                mine.ejected[period].tolist()), "ejections hold all period long"
            theirs.append((reference, ejected_at(reference, start)))
        assert mine.starts[0] == SINCE and mine.starts[-1] < UNTIL
        for rule in RULES:
            cuts = set(mine.intervals(rule).tolist())
            keys = [(health_key(reference, rule), ejected) for reference, ejected in theirs]
            assert cuts == {0} | {p for p in range(1, len(keys)) if keys[p] != keys[p - 1]}, (
                name, rule.name)
