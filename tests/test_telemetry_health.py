"""FleetHealth: EWMA, windows, eject/cooldown/recover, versions. Pure: time is passed in."""

from __future__ import annotations

import pytest
from telemetry_fixtures import T0, sample

from control_plane.telemetry.health import PROVIDER_WIDE, FleetHealth, HealthState, ProviderHealth
from gpu_router.api.v1 import health_pb2


def fleet(**overrides: float) -> FleetHealth:
    settings = {
        "alpha": 0.5,
        "window_s": 10.0,
        "eject_error_rate": 0.5,
        "eject_min_samples": 4,
        "cooldown_s": 5.0,
        **overrides,
    }
    return FleetHealth(**settings)  # type: ignore[arg-type]


def view(
    health: FleetHealth, now_ms: int, model: str = "m1", provider: str = "prov-a"
) -> ProviderHealth:
    found = health.get(provider, model, now_ms)
    assert found is not None, f"no aggregate for ({provider}, {model})"
    return found


def test_ewma_starts_at_first_value_then_smooths() -> None:
    health = fleet(alpha=0.5)
    health.record(sample(T0, total_ms=100.0, ttfb_ms=10.0))
    health.record(sample(T0 + 1, total_ms=200.0, ttfb_ms=30.0))
    health.record(sample(T0 + 2, total_ms=50.0, ttfb_ms=0.0))  # no TTFB known: TTFB EWMA untouched
    current = view(health, T0 + 2)
    assert current.ewma_latency_ms == pytest.approx(0.5 * 50 + 0.5 * (0.5 * 200 + 0.5 * 100))
    assert current.ewma_ttfb_ms == pytest.approx(20.0)
    assert current.samples == 3


def test_errors_and_429s_do_not_move_the_ewma() -> None:
    health = fleet()
    health.record(sample(T0, total_ms=100.0))
    health.record(sample(T0 + 1, status=503, total_ms=5.0))
    health.record(sample(T0 + 2, status=429, total_ms=1.0))
    health.record(sample(T0 + 3, status=0, total_ms=3000.0, upstream_failure=True))
    current = view(health, T0 + 3)
    assert current.ewma_latency_ms == 100.0
    assert (current.samples, current.latency_samples) == (4, 1)
    assert current.error_rate == pytest.approx(2 / 4)
    assert current.rate_429 == pytest.approx(1 / 4)


def test_provider_wide_aggregate_spans_models() -> None:
    health = fleet()
    health.record(sample(T0, model="m1", total_ms=100.0))
    health.record(sample(T0 + 1, model="m2", status=503))
    health.record(sample(T0 + 2, model="", total_ms=300.0))  # fallback route: no ext_proc decision
    wide = health.get("prov-a", PROVIDER_WIDE, T0 + 2)
    assert wide is not None and wide.samples == 3 and wide.error_rate == pytest.approx(1 / 3)
    assert wide.ewma_latency_ms == pytest.approx(0.5 * 300 + 0.5 * 100)
    assert view(health, T0 + 2, "m2").samples == 1
    assert [(e.provider, e.model) for e in health.entries(T0 + 2)] == [
        ("prov-a", ""),
        ("prov-a", "m1"),
        ("prov-a", "m2"),
    ]


def test_window_expiry_clears_error_rate_but_keeps_ewma() -> None:
    health = fleet(window_s=10.0)
    health.record(sample(T0, status=503))
    health.record(sample(T0 + 1, total_ms=80.0))
    assert view(health, T0 + 9_999).error_rate == pytest.approx(0.5)
    current = view(health, T0 + 10_000)
    assert current.error_rate == 0.0  # the 503 at T0 has left; the 200 at T0+1 stays
    assert current.ewma_latency_ms == 80.0 and current.samples == 2
    assert view(health, T0 + 20_000).error_rate == 0.0


def test_degraded_at_half_the_eject_rate() -> None:
    health = fleet(eject_error_rate=0.5)
    for i in range(3):
        health.record(sample(T0 + i))
    health.record(sample(T0 + 3, status=502))
    assert view(health, T0 + 3).state is HealthState.DEGRADED


def test_eject_needs_min_samples() -> None:
    health = fleet(eject_min_samples=4)
    for i in range(3):
        health.record(sample(T0 + i, status=503))
    current = view(health, T0 + 3)
    assert current.state is HealthState.DEGRADED and current.cooldown_until_unix_ms == 0
    health.record(sample(T0 + 3, status=503))
    current = view(health, T0 + 3)
    assert current.state is HealthState.EJECTED
    assert current.cooldown_until_unix_ms == T0 + 3 + 5_000


def test_ejected_until_cooldown_then_judged_on_new_samples_only() -> None:
    health = fleet(window_s=30.0, cooldown_s=5.0, eject_min_samples=4)
    for i in range(4):
        health.record(sample(T0 + i, status=503))
    ejected_until = T0 + 3 + 5_000
    health.record(sample(T0 + 100, total_ms=90.0))  # a straggler success does not end the cooldown
    assert view(health, ejected_until - 1).state is HealthState.EJECTED
    current = view(health, ejected_until)
    # The old errors are still in the 30 s window (reported), but they do not re-eject it.
    assert current.state is HealthState.HEALTHY and current.cooldown_until_unix_ms == 0
    assert current.error_rate == pytest.approx(4 / 5)


def test_fails_again_after_cooldown_is_ejected_again() -> None:
    health = fleet(cooldown_s=5.0, eject_min_samples=4)
    for i in range(4):
        health.record(sample(T0 + i, status=503))
    back = T0 + 3 + 5_000
    for i in range(4):
        health.record(sample(back + i, status=0, upstream_failure=True))
    current = view(health, back + 3)
    assert current.state is HealthState.EJECTED
    assert current.cooldown_until_unix_ms == back + 3 + 5_000


def test_recovers_to_healthy_once_errors_leave_the_window() -> None:
    health = fleet(window_s=10.0, eject_error_rate=0.5)
    health.record(sample(T0, status=503))
    health.record(sample(T0 + 1))
    assert view(health, T0 + 1).state is HealthState.DEGRADED
    assert view(health, T0 + 10_000).state is HealthState.HEALTHY


def test_version_moves_on_records_and_on_time_driven_changes_only() -> None:
    health = fleet(window_s=10.0)
    assert health.version == 0
    health.record(sample(T0))
    after_record = health.version
    assert after_record > 0
    assert health.refresh(T0 + 5_000) is False
    assert health.version == after_record
    assert health.refresh(T0 + 10_000) is True  # the sample aged out of the window
    assert health.version == after_record + 1
    health.snapshot_proto(T0 + 20_000)
    health.to_json(T0 + 20_000)
    assert health.version == after_record + 1


def test_snapshot_proto() -> None:
    health = fleet(eject_min_samples=1, cooldown_s=5.0)
    health.record(sample(T0, provider="prov-b", model="m1", total_ms=40.0, ttfb_ms=8.0))
    health.record(sample(T0 + 1, provider="prov-a", model="m1", status=503))
    snapshot = health.snapshot_proto(T0 + 2)
    assert snapshot.generated_at_unix_ms == T0 + 2
    assert [(e.provider, e.model) for e in snapshot.entries] == [
        ("prov-a", ""),
        ("prov-a", "m1"),
        ("prov-b", ""),
        ("prov-b", "m1"),
    ]
    ejected, healthy = snapshot.entries[1], snapshot.entries[3]
    assert ejected.state == health_pb2.EJECTED and ejected.cooldown_until_unix_ms == T0 + 1 + 5_000
    # samples counts the EWMA's evidence: 0 tells ext_proc the 0.0 latency is unmeasured.
    assert ejected.error_rate == 1.0 and ejected.ewma_latency_ms == 0.0 and ejected.samples == 0
    assert healthy.state == health_pb2.HEALTHY and healthy.cooldown_until_unix_ms == 0
    assert healthy.samples == 1
    assert (healthy.ewma_latency_ms, healthy.ewma_ttfb_ms) == (40.0, 8.0)
    assert health_pb2.HealthSnapshot.FromString(snapshot.SerializeToString()) == snapshot


def test_to_json() -> None:
    health = fleet(eject_min_samples=1, cooldown_s=5.0)
    health.record(sample(T0, model="m1", status=503))
    doc = health.to_json(T0)
    assert doc["generated_at"] == "2023-11-14T22:13:20.000+00:00"
    provider = doc["providers"]["prov-a"]
    assert provider["state"] == "ejected"
    assert provider["cooldown_until"] == "2023-11-14T22:13:25.000+00:00"
    assert provider["ewma_latency_ms"] is None
    assert provider["models"]["m1"] == {
        "ewma_latency_ms": None,
        "ewma_ttfb_ms": None,
        "samples": 1,
        "latency_samples": 0,
        "error_rate": 1.0,
        "rate_429": 0.0,
        "state": "ejected",
        "cooldown_until": "2023-11-14T22:13:25.000+00:00",
        "reason": "error rate 100% over 10 s",
        "first_failure_at": "2023-11-14T22:13:20.000+00:00",
        "last_ejected_at": "2023-11-14T22:13:20.000+00:00",
    }
    assert provider["in_flight"] == 0
    assert doc["version"] == health.version
    assert (doc["weights"], doc["weights_pushed_at"]) == (None, None)

    health.record_pushed_weights({"prov-a": 0, "prov-b": 100}, T0 + 1)
    doc = health.to_json(T0 + 2)
    assert doc["weights"] == {"prov-a": 0, "prov-b": 100}
    assert doc["weights_pushed_at"] == "2023-11-14T22:13:20.001+00:00"


def test_in_flight_is_summed_over_edges_per_provider() -> None:
    health = fleet()
    health.record(sample(T0, provider="prov-a", model="m1"))
    version = health.version
    health.record_in_flight("stream-1", {"prov-a": 2, "prov-b": 1}, edge="edge-1")
    health.record_in_flight("stream-2", {"prov-a": 3}, edge="edge-2")
    assert view(health, T0, PROVIDER_WIDE).in_flight == 5
    assert view(health, T0, "m1").in_flight is None  # Envoy counts per cluster, not per model
    assert view(health, T0, PROVIDER_WIDE, provider="prov-b").in_flight == 1  # a provider seen in flight only
    assert [(e.provider, e.model, e.in_flight) for e in health.snapshot_proto(T0).entries] == [
        ("prov-a", "", 5), ("prov-a", "m1", 0), ("prov-b", "", 1)]
    assert health.version == version + 2

    health.record_in_flight("stream-1", {"prov-a": 2, "prov-b": 1}, edge="edge-1")
    assert health.version == version + 2  # the same counts again: nothing to publish

    health.record_in_flight("stream-1", {}, edge="edge-1")
    assert view(health, T0, PROVIDER_WIDE).in_flight == 3
    health.forget_in_flight("stream-2")
    health.forget_in_flight("stream-9")
    assert view(health, T0, PROVIDER_WIDE).in_flight == 0
    assert health.version == version + 4


OFFERINGS = {"prov-a": ("m1",), "prov-b": ("m1",)}


def at_cap(health: FleetHealth) -> dict[str, list[str]]:
    return {a.edge: list(a.providers) for a in health.snapshot_proto(T0).at_cap}


def test_the_snapshot_names_each_edge_s_providers_at_their_cap() -> None:
    """Per edge, not summed (the cap is each edge's: provider_cap.py), by its latest report."""
    health = fleet()
    health.use_policy(OFFERINGS, {"prov-a": 4, "prov-b": 2})
    health.record_in_flight("stream-1", {"prov-a": 4, "prov-b": 1}, edge="edge-1")
    health.record_in_flight("stream-2", {"prov-a": 3}, edge="edge-2")
    assert at_cap(health) == {"edge-1": ["prov-a"]}  # edge-2's 3 of prov-a's 4 is not
    assert health.to_json(T0)["at_cap"] == {"edge-1": ["prov-a"]}  # /v1/health shows it
    version = health.version
    health.record_in_flight("stream-2", {"prov-a": 3}, edge="edge-2")
    health.use_policy(OFFERINGS, {"prov-a": 4, "prov-b": 2})
    assert health.version == version  # nothing changed: nothing to publish
    health.record_in_flight("stream-2", {"prov-a": 4}, edge="edge-2")
    assert at_cap(health) == {"edge-1": ["prov-a"], "edge-2": ["prov-a"]}
    assert health.version == version + 1  # an edge reached a cap: published

    # edge-1 reconnects: its new stream's report counts, the old one's lingering counts not,
    # in at_cap and in the fleet's sums alike.
    health.record_in_flight("stream-3", {"prov-b": 2}, edge="edge-1")
    assert at_cap(health) == {"edge-1": ["prov-b"], "edge-2": ["prov-a"]}
    assert health.to_json(T0)["providers"]["prov-a"]["in_flight"] == 4  # edge-2's only
    health.forget_in_flight("stream-1")  # the old stream seen to end
    assert at_cap(health) == {"edge-1": ["prov-b"], "edge-2": ["prov-a"]}
    health.forget_in_flight("stream-2")
    assert at_cap(health) == {"edge-1": ["prov-b"]}


def test_a_policy_change_is_one_new_version_and_a_reload_of_the_same_policy_none() -> None:
    """Offerings and caps arrive together: one snapshot to publish for a policy change."""
    health = fleet()
    health.record(sample(T0, provider="prov-c"))
    version = health.version
    health.use_policy(OFFERINGS, {"prov-a": 4, "prov-b": 2})
    assert health.version == version + 1
    assert health.get("prov-c", PROVIDER_WIDE, T0) is None  # not in the policy: forgotten
    health.use_policy({"prov-a": ["m1"], "prov-b": ["m1"]}, {"prov-a": 4, "prov-b": 2})
    assert health.version == version + 1  # the same policy again
    health.use_policy(OFFERINGS, {"prov-a": 4, "prov-b": 3})
    assert health.version == version + 2  # a cap alone changed
    health.use_policy({"prov-a": ("m1",)}, {"prov-a": 4, "prov-b": 3})
    assert health.version == version + 3  # the offerings alone changed


def test_error_ejection_reason_names_the_rate_and_window() -> None:
    health = fleet(window_s=30.0, eject_error_rate=0.6, eject_min_samples=5)
    for i, status in enumerate([200, 200, 503, 503, 503]):
        health.record(sample(T0 + i, status=status))
    current = view(health, T0 + 4, PROVIDER_WIDE)
    assert current.state is HealthState.EJECTED
    assert current.reason == "error rate 60% over 30 s"


def test_degraded_has_a_reason_and_healthy_none() -> None:
    health = fleet(window_s=10.0, eject_error_rate=0.5)
    for i, status in enumerate([200, 200, 200, 502]):
        health.record(sample(T0 + i, status=status))
    assert view(health, T0 + 3).reason == "error rate 25% over 10 s"
    assert view(health, T0 + 10_003).reason == ""


def test_429_with_retry_after_ejects_the_provider_for_every_model() -> None:
    health = fleet(cooldown_s=5.0)
    health.record(sample(T0, model="m1"))
    health.record(sample(T0 + 10, model="m1", status=429, retry_after_s=2.0))
    wide = view(health, T0 + 10, PROVIDER_WIDE)
    assert wide.state is HealthState.EJECTED
    assert wide.cooldown_until_unix_ms == T0 + 10 + 2_000
    assert wide.reason == "rate limited (Retry-After 2 s)"
    assert wide.last_ejected_unix_ms == T0 + 10 and wide.first_failure_unix_ms == T0 + 10
    # The per-model entry counts the 429 but is not itself ejected: the provider-wide one is.
    model = view(health, T0 + 10, "m1")
    assert model.state is HealthState.HEALTHY and model.rate_429 == pytest.approx(0.5)
    assert view(health, T0 + 10 + 1_999, PROVIDER_WIDE).state is HealthState.EJECTED
    back = view(health, T0 + 10 + 2_000, PROVIDER_WIDE)
    assert back.state is HealthState.HEALTHY and back.cooldown_until_unix_ms == 0
    assert back.reason == "" and back.error_rate == 0.0  # a 429 is not an error


def test_429_without_retry_after_uses_the_cooldown() -> None:
    health = fleet(cooldown_s=5.0)
    health.record(sample(T0, status=429))
    wide = view(health, T0, PROVIDER_WIDE)
    assert (wide.state, wide.cooldown_until_unix_ms) == (HealthState.EJECTED, T0 + 5_000)
    assert wide.reason == "rate limited (no Retry-After)"


def test_retry_after_is_capped() -> None:
    health = fleet(max_retry_after_s=300.0)
    health.record(sample(T0, status=429, retry_after_s=86_400.0))
    wide = view(health, T0, PROVIDER_WIDE)
    assert wide.cooldown_until_unix_ms == T0 + 300_000
    assert wide.reason == "rate limited (Retry-After 300 s)"


def test_a_429_never_shortens_a_running_cooldown() -> None:
    health = fleet(cooldown_s=5.0, eject_min_samples=4)
    for i in range(4):
        health.record(sample(T0 + i, status=503))
    health.record(sample(T0 + 10, status=429, retry_after_s=1.0))
    wide = view(health, T0 + 10, PROVIDER_WIDE)
    assert wide.cooldown_until_unix_ms == T0 + 3 + 5_000
    assert wide.reason == "error rate 100% over 10 s"
    health.record(sample(T0 + 20, status=429, retry_after_s=60.0))
    wide = view(health, T0 + 20, PROVIDER_WIDE)
    assert wide.cooldown_until_unix_ms == T0 + 20 + 60_000
    assert wide.reason == "rate limited (Retry-After 60 s)"
    assert wide.last_ejected_unix_ms == T0 + 20


def test_time_to_eject_is_first_failure_to_ejection_of_one_episode() -> None:
    health = fleet(window_s=10.0, cooldown_s=5.0, eject_min_samples=4)
    health.record(sample(T0))
    never = view(health, T0, PROVIDER_WIDE)
    assert (never.first_failure_unix_ms, never.last_ejected_unix_ms) == (0, 0)
    for at in (T0 + 100, T0 + 150, T0 + 200, T0 + 250, T0 + 300):
        health.record(sample(at, status=503))
    ejected = view(health, T0 + 300, PROVIDER_WIDE)
    assert ejected.state is HealthState.EJECTED
    assert (ejected.first_failure_unix_ms, ejected.last_ejected_unix_ms) == (T0 + 100, T0 + 200)
    # Once the window holds no failure the episode is over; the next failure starts a new one.
    quiet = T0 + 300 + 10_000
    assert view(health, quiet, PROVIDER_WIDE).state is HealthState.HEALTHY
    health.record(sample(quiet + 5, status=0, upstream_failure=True))
    again = view(health, quiet + 5, PROVIDER_WIDE)
    assert (again.first_failure_unix_ms, again.last_ejected_unix_ms) == (quiet + 5, T0 + 200)


@pytest.mark.parametrize(
    "bad",
    [
        {"alpha": 0.0},
        {"window_s": 0.0},
        {"eject_error_rate": 1.5},
        {"eject_min_samples": 0},
        {"cooldown_s": -1.0},
        {"max_retry_after_s": -1.0},
    ],
)
def test_rejects_nonsense_settings(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        fleet(**bad)


def test_failures_in_a_row_eject_a_provider_with_a_long_good_past() -> None:
    health = fleet(eject_consecutive=3)
    for i in range(100):
        health.record(sample(T0 + i))
    for i in range(2):
        health.record(sample(T0 + 200 + i, 503, upstream_failure=True))
    assert view(health, T0 + 202).state is HealthState.HEALTHY  # 2% errors, 2 in a row

    health.record(sample(T0 + 203, 0, upstream_failure=True))

    ejected = view(health, T0 + 203)
    assert ejected.state is HealthState.EJECTED
    assert ejected.reason == "3 failures in a row"


def test_a_success_breaks_the_run_of_failures() -> None:
    health = fleet(eject_consecutive=3)
    for i, status in enumerate((200, 200, 200, 200, 503, 503, 200, 200, 503, 503)):
        health.record(sample(T0 + i, status))

    assert view(health, T0 + 10).state is HealthState.DEGRADED  # 40%: not by rate, not in a row


def test_a_window_holds_no_object_the_garbage_collector_tracks_per_sample() -> None:
    """Full collections walk every tracked object: a busy fleet's windows must not add any."""
    import gc

    health = FleetHealth()
    samples = [sample(T0 + i, 503 if i % 7 == 0 else 200) for i in range(2000)]
    gc.collect()
    before = len(gc.get_objects())
    for s in samples:
        health.record(s)
    gc.collect()
    assert len(gc.get_objects()) - before < 100
    view = health.get("prov-a", "m1", T0 + 2000)
    assert view is not None and view.samples == 2000
