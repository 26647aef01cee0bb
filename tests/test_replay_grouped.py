"""`gpu-router replay` folds rows into groups and decides once per distinct outcome key; the
row-by-row replay it replaced (tests/replay_reference.py) must give the same answer on a
synthetic ledger with ejections, degraded providers and every strategy."""

from __future__ import annotations

import math
import random
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from replay_reference import replay as reference_replay

from control_plane.ledger.health_history import HealthRow, snapshot_of
from control_plane.policy.load import default_policy_path, load_policy_file
from control_plane.policy.wire import to_routing_policy
from ext_proc.health_view import build_health_view
from ext_proc.routing_table import build_routing_table
from gpu_router import replay as replay_module
from gpu_router.replay import replay
from gpu_router.replay_health import aligned_health

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from ledger_scale import fill

DAY_MS = 86_400_000


def same(mine: Any, theirs: Any) -> None:
    """Equal, floats to 1e-9 relative (sums in another order)."""
    if isinstance(theirs, dict):
        assert mine.keys() == theirs.keys()
        for key in theirs:
            same(mine[key], theirs[key])
    elif isinstance(theirs, float):
        assert mine == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    else:
        assert mine == theirs


def policy(tmp_path: Path, strategy: str, **extra: object) -> Any:
    document = yaml.safe_load(default_policy_path().read_text())
    for rule in document["policies"]:
        rule.update(strategy=strategy, **extra)
        if "cost_ceiling_usd_per_mtok" not in extra:
            rule.pop("cost_ceiling_usd_per_mtok", None)
    path = tmp_path / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_policy_file(path)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("replay") / "ledger.db"
    now_ms = int(time.time() * 1000)
    fill(path, 20_000, now_ms, days=1)
    with sqlite3.connect(path) as connection:  # some degraded spells and unscored first picks
        connection.execute("UPDATE health_history SET state = 'degraded' "
                           "WHERE (at_unix_ms / 10000) % 97 < 9 AND provider = 'coreweave'")
        connection.execute("UPDATE health_history SET ewma_ms = NULL "
                           "WHERE (at_unix_ms / 10000) % 89 = 3 AND provider = 'vast'")
        connection.execute("UPDATE requests SET candidates = 'vast=x:ejected;' || candidates "
                           "WHERE id % 13 = 0")
    return path, now_ms


@pytest.mark.parametrize("strategy, extra", [
    ("default", {}), ("latency", {"cost_ceiling_usd_per_mtok": 0.2}),
    ("cost", {"latency_sla_ms": 0}), ("cost", {"latency_sla_ms": 60}), ("balanced", {})])
def test_grouped_replay_equals_the_row_by_row_one(ledger: tuple[Path, int], tmp_path: Path,
                                                  strategy: str, extra: dict) -> None:
    path, now_ms = ledger
    config = (load_policy_file(default_policy_path()) if strategy == "default"
              else policy(tmp_path, strategy, **extra))
    since, until = now_ms - DAY_MS - 1000, now_ms + 1
    mine, theirs = replay(path, config, since, until), reference_replay(path, config, since, until)
    same(mine.to_json(), theirs.to_json())
    assert theirs.requests > 19_000 and theirs.changed > 0 and theirs.to_ejected > 0
    assert mine.decide_calls <= theirs.decide_calls


def test_a_window_replayed_in_slices_equals_the_row_by_row_one(
        ledger: tuple[Path, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory is bounded by replaying a slice of the window at a time: groups cut at a slice's
    edge, ejections and cooldowns across it, and the picks remembered per slice must not
    change the answer (a day in 7 h slices, the last one short)."""
    path, now_ms = ledger
    monkeypatch.setattr(replay_module, "SLICE_MS", 7 * 3_600_000)
    config = load_policy_file(default_policy_path())
    since, until = now_ms - DAY_MS - 1000, now_ms + 1
    mine, theirs = replay(path, config, since, until), reference_replay(path, config, since, until)
    same(mine.to_json(), theirs.to_json())
    assert theirs.changed > 0 and theirs.to_ejected > 0


def test_aligned_health_is_what_the_snapshot_aligns_to() -> None:
    table = build_routing_table(to_routing_policy(load_policy_file(default_policy_path())))
    rng = random.Random(5)
    for _ in range(500):
        rows = [HealthRow(at_unix_ms=0, provider=provider, model=model, ttfb_ms=None,
                          ewma_ms=rng.choice((None, 0.0, rng.uniform(10, 300))),
                          error_rate=0.0, rate_429=0.0, reason="",
                          state=rng.choice(("healthy", "degraded", "ejected")),
                          ejected_until=rng.choice((0, 5, 10)))
                for provider in table.providers for model in ("", *table.models)
                if rng.random() < 0.6]
        current = {(r.provider, r.model): (r.ewma_ms, r.state, r.ejected_until) for r in rows}
        view = build_health_view(snapshot_of(rows, 0))
        for route in table.models.values():
            mine, theirs = aligned_health(route, current), view.align(route)
            assert [math.isnan(v) or v for v in mine.latencies] == [
                math.isnan(v) or v for v in theirs.latencies]
            assert (mine.degraded_flags, mine.ejected_until) == (
                theirs.degraded_flags, theirs.ejected_until)
