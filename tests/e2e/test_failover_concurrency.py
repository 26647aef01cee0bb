"""Failover at real concurrency: 64 clients through one edge while the winning provider fails
in every way it can, then while every provider fails at once."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from fleet_harness import PROVIDERS, Fleet, hold, phase, running_fleet
from stack_harness import BATCH, CLIENTS, MODEL, Traffic, chat

PER_PHASE = 300
"""Requests served during each fault, across the 64 clients."""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("concurrency")) as running:
        yield running


def attempts(fleet: Fleet) -> int:
    """Requests Envoy sent to providers (every attempt), on the one edge."""
    stats = fleet.edges[0].admin.stats("cluster.")
    return sum(stats.get(f"cluster.{name}.upstream_rq_total", 0) for name in PROVIDERS)


def test_the_winner_failing_every_way_never_reaches_64_clients(fleet: Fleet) -> None:
    fleet.providers.reset_all()
    with Traffic(fleet.edges, MODEL, BATCH, threads=CLIENTS) as traffic:
        hold(traffic, traffic.total, PER_PHASE)
        for fault in ({"mode": "error", "status": 503}, {"mode": "rate_limit", "retry_after_s": 1},
                      {"mode": "reset"}, {"mode": "hang"}):
            phase(f"runpod {fault}")
            fleet.providers.fault("runpod", rate=1.0, **fault)
            hold(traffic, traffic.total, PER_PHASE)
            fleet.providers.call("runpod", "/_sim/reset", {})
            fleet.recovered("runpod")
            hold(traffic, lambda: traffic.count("runpod"), 20)  # the winner serves again

        phase("runpod refuses connections")
        fleet.sims["runpod"].kill()
        hold(traffic, traffic.total, PER_PHASE)
        fleet.sims["runpod"].start()
        fleet.recovered("runpod")
        hold(traffic, traffic.total, PER_PHASE)

    assert traffic.failures() == {}, (traffic.failed, fleet.overflows())
    assert not [name for name in fleet.overflows()[0] if "retry_overflow" in name]
    served = {provider for (_, provider) in traffic.outcomes}
    assert served >= {"runpod", "lambda"}


def test_every_provider_failing_gives_each_client_one_json_error_after_bounded_attempts(
    fleet: Fleet,
) -> None:
    fleet.providers.reset_all()
    for name in PROVIDERS:
        fleet.recovered(name)
    for name in PROVIDERS:
        fleet.providers.fault(name, mode="error", status=503, rate=1.0)
    before = attempts(fleet)
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(lambda _: chat(fleet.edges[0], MODEL, BATCH), range(4 * CLIENTS)))
    finally:
        fleet.providers.reset_all()
    sent = attempts(fleet) - before

    # The last provider's own 503, or Envoy's 503/504 when an attempt was cut (a per-try
    # timeout on this loaded machine): one error each, never a hang or a reset.
    assert {status for status, _, _ in answers} <= {502, 503, 504}, answers[:3]
    for _, headers, body in answers:
        assert headers["content-type"].startswith("application/json")
        assert isinstance(body, dict) and body["error"]["message"], body
    # At most the winner and max_fallbacks (2) others per client request: no retry storm.
    assert 0 < sent <= 3 * len(answers), (sent, len(answers))
