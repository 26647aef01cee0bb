"""ModelAttribution: attempts meet their request's model in either order, bounded in time and size."""

from __future__ import annotations

import pytest
from telemetry_fixtures import T0, sample

from control_plane.telemetry.attribution import ModelAttribution
from control_plane.telemetry.samples import RequestSample


def attempt(request_id: str, provider: str = "prov-a", at_ms: int = T0) -> RequestSample:
    return sample(at_ms, 503, provider=provider, model="", total_ms=5.0, ttfb_ms=0.0,
                  policy="", reason="", request_id=request_id)


def test_attempts_before_their_request_get_its_model() -> None:
    join = ModelAttribution()
    assert join.attempt(attempt("r1", "prov-a"), T0) is None
    assert join.attempt(attempt("r1", "prov-b"), T0 + 1) is None
    assert join.attempt(attempt("r2", "prov-a"), T0 + 1) is None
    released = join.request("r1", "m1", T0 + 100)
    assert [(s.provider, s.model, s.at_unix_ms) for s in released] == [
        ("prov-a", "m1", T0 + 100),
        ("prov-b", "m1", T0 + 100),
    ]
    assert join.request("r1", "m1", T0 + 101) == []  # released once


def test_attempts_after_their_request_get_its_model() -> None:
    join = ModelAttribution(model_ttl_s=5.0)
    assert join.request("r1", "m1", T0) == []
    late = join.attempt(attempt("r1"), T0 + 50)
    assert late is not None and (late.model, late.at_unix_ms) == ("m1", T0 + 50)
    assert join.attempt(attempt("r1"), T0 + 5_000) is None  # the model was forgotten: it waits


def test_requests_without_a_model_release_and_absorb_their_attempts() -> None:
    join = ModelAttribution()
    join.attempt(attempt("r1"), T0)
    assert join.request("r1", "", T0 + 1) == []
    assert join.attempt(attempt("r1"), T0 + 2) is None
    assert join.pending == 1  # only the remembered "no model": nothing waits in vain


def test_attempts_without_a_request_id_are_not_kept() -> None:
    join = ModelAttribution()
    assert join.attempt(attempt(""), T0) is None
    assert join.request("", "m1", T0) == []
    assert join.pending == 0


def test_waiting_attempts_expire() -> None:
    join = ModelAttribution(attempt_ttl_s=10.0)
    join.attempt(attempt("r1"), T0)
    assert join.request("r1", "m1", T0 + 10_000) == []
    assert join.pending == 1  # the model it just learnt, for late attempts


def test_the_oldest_are_dropped_when_full() -> None:
    join = ModelAttribution(max_pending=2)
    for i in range(3):
        join.attempt(attempt(f"r{i}"), T0 + i)
    assert join.request("r0", "m1", T0 + 3) == []
    assert [s.request_id for s in join.request("r2", "m1", T0 + 3)] == ["r2"]


@pytest.mark.parametrize("bad", [{"attempt_ttl_s": 0.0}, {"model_ttl_s": -1.0}, {"max_pending": 0}])
def test_rejects_nonsense_settings(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ModelAttribution(**bad)  # type: ignore[arg-type]
