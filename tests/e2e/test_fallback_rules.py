"""While ext_proc is unavailable, the edge still keeps the policy's rules: only inference paths,
only known models, only fitting providers in the strategy's order, and every request booked
with its model and price."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from polling import eventually
from stack_harness import (
    BATCH,
    CLIENTS,
    Providers,
    Traffic,
    chat,
    default_stack,
    post,
)

from control_plane.translate.fallback_routes import FALLBACK_REASON
from gpu_router.processes import http_get
from gpu_router.stack import Stack


@pytest.fixture(scope="module")
def without_ext_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with default_stack(tmp_path_factory.mktemp("fallback-rules")) as stack:
        stack.kill("ext-proc-1")
        yield stack


def test_a_known_model_goes_to_the_policys_cheapest_fitting_provider(without_ext_proc: Stack) -> None:
    status, headers, body = chat(without_ext_proc, "llama3-8b", BATCH)  # an alias
    assert status == 200, body
    assert headers["x-gpu-router-reason"] == FALLBACK_REASON
    assert headers["x-gpu-router-provider"] == "vast"  # batch is cost-first: vast is cheapest

    status, headers, body = chat(without_ext_proc, "mixtral-8x7b", BATCH)
    assert status == 200, body
    assert headers["x-gpu-router-provider"] == "runpod"  # vast's 24 GB GPU cannot hold mixtral


def test_an_unknown_model_or_path_gets_a_json_404_and_reaches_no_provider(
    without_ext_proc: Stack,
) -> None:
    status, headers, body = chat(without_ext_proc, "gpt-expensive")
    assert (status, body["error"]["code"]) == (404, "model_not_found"), body
    assert "x-gpu-router-provider" not in headers
    status, _, body = post(f"{without_ext_proc.url}/v1/fine_tuning/jobs", {"model": "llama-3.1-8b"})
    assert (status, body["error"]["code"]) == (404, "unknown_url"), body


def test_the_models_list_is_answered_from_the_policy(without_ext_proc: Stack) -> None:
    status, body = http_get(f"{without_ext_proc.url}/v1/models")
    assert status == 200
    ids = [model["id"] for model in json.loads(body)["data"]]
    assert ids == ["llama-3.1-8b", "mixtral-8x7b", "llama-3.1-70b", "bge-large"]


def test_fallback_requests_are_booked_with_their_model_and_price(without_ext_proc: Stack) -> None:
    status, headers, _ = chat(without_ext_proc, "llama-3.1-8b", {**BATCH, "x-request-id": "fb-1"})
    assert status == 200 and headers["x-gpu-router-reason"] == FALLBACK_REASON
    ledger = without_ext_proc.log_dir / "ledger.db"

    def booked() -> tuple | None:
        with sqlite3.connect(ledger) as db:
            return db.execute(
                "select model, policy, provider, cost_usd from requests where client_request_id = 'fb-1'"
            ).fetchone()

    model, policy, provider, cost = eventually(booked, "the fallback request in the ledger")
    assert (model, policy, provider) == ("llama-3.1-8b", "batch", "vast")
    assert cost > 0


# (model asked for, provider the fallback routes must pick; None: refused with a 404)
ASKS = (("llama-3.1-8b", "vast"), ("mixtral-8x7b", "runpod"), ("gpt-expensive", None))


def test_64_clients_at_once_each_get_the_policys_answer_and_are_booked(
    without_ext_proc: Stack,
) -> None:
    """The fallback at production concurrency: 64 requests side by side, a third of them for a
    model the policy does not have. Each gets its own model's answer (no request's route leaks
    into another's), none fails, and each is booked once."""
    asks = [(f"fb-load-{i}", *ASKS[i % len(ASKS)]) for i in range(CLIENTS)]

    def send(ask: tuple[str, str, str | None]) -> tuple[int, dict[str, str], object]:
        request_id, model, _ = ask
        return chat(without_ext_proc, model, {**BATCH, "x-request-id": request_id})

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(send, asks))
    for (request_id, model, provider), (status, headers, body) in zip(asks, answers, strict=True):
        if provider is None:
            assert (status, body["error"]["code"]) == (404, "model_not_found"), (request_id, body)
            assert "x-gpu-router-provider" not in headers
        else:
            assert status == 200, (request_id, body)
            assert headers["x-gpu-router-reason"] == FALLBACK_REASON, request_id
            assert headers["x-gpu-router-provider"] == provider, (request_id, model)
    # The refused ones are booked too, with no model or provider: nobody served them.
    expected = {request_id: (model, provider, 200) if provider else ("", "", 404)
                for request_id, model, provider in asks}
    ledger = without_ext_proc.log_dir / "ledger.db"

    def booked() -> list[tuple[str, str, str, int]] | None:
        with sqlite3.connect(ledger) as db:
            rows = db.execute("select client_request_id, model, provider, status from requests "
                              "where client_request_id like 'fb-load-%'").fetchall()
        return rows if len(rows) >= len(expected) else None

    rows = eventually(booked, "every request in the ledger")
    assert len(rows) == len(expected)
    assert {request_id: tuple(rest) for request_id, *rest in rows} == expected


def test_the_fallback_fails_over_a_provider_outage_for_64_clients(without_ext_proc: Stack) -> None:
    """ext_proc down and the policy's first provider answering 503 to nearly everything (99%:
    at 100% the simulator fails its health check too, and Envoy would never send it one): 64
    clients at once are all served, with the fallback's reason, the failures failed over to the
    next fitting provider in the strategy's order."""
    providers = Providers(without_ext_proc.policy)
    before = providers.stats("vast")["requests"]  # earlier tests of the module sent it some
    providers.fault("vast", mode="error", status=503, rate=0.99)
    try:
        with Traffic(without_ext_proc, "llama-3.1-8b", BATCH, threads=CLIENTS) as traffic:
            eventually(lambda: traffic.total() >= 4 * CLIENTS, "requests through the outage")
        met = providers.stats("vast")["requests"] - before
    finally:
        providers.reset_all()
    assert traffic.failures() == {}, traffic.failed
    assert {exchange.reason for exchange in traffic.exchanges} == {FALLBACK_REASON}
    assert traffic.count("runpod") > 0 and met > 0  # the outage was met and failed over
