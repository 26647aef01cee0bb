"""Client keys without servers: the policy's clients section, the wire, ext_proc's gate (key,
budget, rate limit), the model allow-list and forced policy, and the control plane's spend."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from ext_proc_fixtures import headers_request
from google.protobuf import json_format

from control_plane.client_spend import ClientSpend, snapshot_proto
from control_plane.ledger.store import LedgerRow, LedgerWriter
from control_plane.policy.load import PolicyError, default_policy_path, load_policy_text
from control_plane.policy.model import Budget, Client, Limits
from control_plane.policy.wire import to_routing_policy
from ext_proc.admission import Admission, estimated_tokens
from ext_proc.rate_limit import LocalCounters, RateLimiter, retry_after_s
from ext_proc.request import RequestPhases
from ext_proc.router_state import LiveState
from gpu_router.cli import main
from gpu_router.edge_guard import open_edge_refusal
from gpu_router.keys_cli import key_sha256, new_key

KEYS = {name: f"gr-test-key-{name}" for name in ("search", "batchy", "capped", "slow")}


def clients_yaml() -> list[dict[str, Any]]:
    return [
        {"name": "search", "key_sha256": key_sha256(KEYS["search"]),
         "models": ["llama3-8b"]},
        {"name": "batchy", "key_sha256": key_sha256(KEYS["batchy"]), "policy": "batch"},
        {"name": "capped", "key_sha256": key_sha256(KEYS["capped"]),
         "budget": {"usd": 0.5, "per": "1h"}},
        {"name": "slow", "key_sha256": key_sha256(KEYS["slow"]),
         "limits": {"requests_per_minute": 3}},
    ]


def policy_text(clients: list[dict[str, Any]]) -> str:
    document = yaml.safe_load(default_policy_path().read_text())
    document["clients"] = clients
    return yaml.safe_dump(document, sort_keys=False)


def load(clients: list[dict[str, Any]]):
    return load_policy_text(policy_text(clients), "policy.yaml")


def test_clients_are_read_with_canonical_models_budget_windows_and_limits() -> None:
    config = load(clients_yaml())
    search, batchy, capped, slow = config.clients
    assert search == Client(name="search", key_sha256=key_sha256(KEYS["search"]),
                            models=("llama-3.1-8b",))
    assert batchy.policy == "batch" and batchy.budget is None
    assert capped.budget == Budget(usd=0.5, window_s=3600)
    assert slow.limits == Limits(requests_per_minute=3)


def test_every_clients_problem_names_its_line_and_key_path() -> None:
    bad = [
        {"name": "a", "key_sha256": "ab" * 32},
        {"name": "a", "key_sha256": "AB" * 32, "budget": {"usd": -1, "per": "1w"},
         "models": ["nope"], "policy": "nope", "limits": {"rpm": 1}, "key": "gr-x"},
        {"name": "b", "key_sha256": "ab" * 32},
    ]
    with pytest.raises(PolicyError) as raised:
        load(bad)
    text = str(raised.value)
    for expected in (
        "clients[1].name: duplicate client name 'a'",
        "clients[1].key_sha256: 'ABAB",
        "clients[1].budget.usd: must be >= 0",
        "clients[1].budget.per: '1w' is not valid",
        "clients[1].models[0]: unknown model 'nope'",
        "clients[1].policy: unknown policy 'nope'",
        "clients[1].limits.rpm: unknown key",
        "clients[1].key: unknown key",
        "clients[2].key_sha256: duplicate key_sha256",
    ):
        assert expected in text
    assert all(line.startswith("policy.yaml:") for line in text.splitlines())


def test_the_wire_carries_hashes_never_keys_and_unset_budgets_stay_unset() -> None:
    wire = to_routing_policy(load(clients_yaml()))
    assert [c.name for c in wire.clients] == ["search", "batchy", "capped", "slow"]
    assert not wire.clients[0].HasField("budget_usd")
    assert wire.clients[2].budget_usd == 0.5 and wire.clients[2].budget_window_s == 3600
    assert not any(key.encode() in wire.SerializeToString() for key in KEYS.values())


def test_keys_new_makes_distinct_long_prefixed_keys() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(key.startswith("gr-") and len(key) >= 3 + 43 for key in keys)  # 256 bits
    key = next(iter(keys))
    assert key_sha256(key) == hashlib.sha256(key.encode()).hexdigest()


def live_with(clients: list[dict[str, Any]]) -> LiveState:
    live = LiveState()
    live.apply_policy(to_routing_policy(load(clients)))
    return live


def chat(key: str | None = None, header: str = "authorization",
         model: str = "llama-3.1-8b") -> ext_proc_pb2.ProcessingRequest:
    headers = {} if key is None else {
        header: f"Bearer {key}" if header == "authorization" else key}
    request = headers_request(body_fields={"model": model, "max_tokens": 16},
                              content_type="application/json", content_length="80")
    for name, value in headers.items():
        entry = request.request_headers.headers.headers.add()
        entry.key, entry.raw_value = name, value.encode()
    return request


def answer(live: LiveState, request: ext_proc_pb2.ProcessingRequest,
           admission: Admission | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status: 0 when routed, the error body or the route, the gpu_router metadata)."""
    gate = admission or Admission(RateLimiter(LocalCounters()))
    state = live.current
    admitted = asyncio.run(gate.admit(state, request))
    metadata = json_format.MessageToDict(admitted.dynamic_metadata) if isinstance(
        admitted, ext_proc_pb2.ProcessingResponse) else {}
    if isinstance(admitted, ext_proc_pb2.ProcessingResponse):
        immediate = admitted.immediate_response
        headers = {h.header.key: h.header.raw_value.decode() for h in immediate.headers.set_headers}
        body = json.loads(immediate.body)
        body["headers"] = headers
        return immediate.status.code, body, metadata.get("gpu_router", {})
    phases = RequestPhases(state)
    phases.client = admitted
    response = phases.handle(request)
    if response.HasField("immediate_response"):
        return response.immediate_response.status.code, json.loads(
            response.immediate_response.body), {}
    route = response.request_headers.response.header_mutation.set_headers[0].header
    return 0, {"route": route.raw_value.decode()}, {}


def test_no_key_or_an_unknown_key_is_401_and_a_known_key_routes() -> None:
    live = live_with(clients_yaml())
    for request in (chat(), chat("gr-wrong"), chat(KEYS["search"][:-1]),
                    chat(KEYS["search"], header="x-api-key-other")):
        status, body, _ = answer(live, request)
        assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    assert answer(live, chat(KEYS["search"]))[0] == 0
    assert answer(live, chat(KEYS["search"], header="x-api-key"))[0] == 0


def test_the_models_list_needs_no_key() -> None:
    live = live_with(clients_yaml())
    admitted = asyncio.run(Admission(RateLimiter(LocalCounters())).admit(
        live.current, headers_request("/v1/models", "GET")))
    assert admitted is None


def test_a_model_outside_the_allow_list_is_403_by_name_or_alias() -> None:
    live = live_with(clients_yaml())
    status, body, _ = answer(live, chat(KEYS["search"], model="mixtral-8x7b"))
    assert (status, body["error"]["code"]) == (403, "model_not_allowed")
    assert answer(live, chat(KEYS["search"], model="llama3-8b"))[0] == 0


def test_a_client_policy_is_forced_over_the_match() -> None:
    live = live_with(clients_yaml())
    assert answer(live, chat(KEYS["search"]))[1]["route"].startswith("interactive/")
    assert answer(live, chat(KEYS["batchy"]))[1]["route"].startswith("batch/")


def test_a_spent_budget_is_429_insufficient_quota_tagged_with_the_client() -> None:
    live = live_with(clients_yaml())
    live.apply_spend(snapshot_proto({"capped": 0.49}, 0))
    assert answer(live, chat(KEYS["capped"]))[0] == 0
    live.apply_spend(snapshot_proto({"capped": 0.5}, 0))
    status, body, metadata = answer(live, chat(KEYS["capped"]))
    assert (status, body["error"]["code"]) == (429, "insufficient_quota")
    assert metadata == {"client": "capped"}
    assert answer(live, chat(KEYS["search"]))[0] == 0  # others are unaffected


def test_a_rate_limit_refuses_with_retry_after_and_refusals_do_not_count() -> None:
    live = live_with(clients_yaml())
    gate = Admission(RateLimiter(LocalCounters(), clock=lambda: 600.0))  # a minute's start
    outcomes = [answer(live, chat(KEYS["slow"]), gate) for _ in range(6)]
    assert [status for status, _, _ in outcomes] == [0, 0, 0, 429, 429, 429]
    _status, body, metadata = outcomes[3]
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["headers"]["retry-after"] == "60"
    assert metadata == {"client": "slow"}
    later = Admission(RateLimiter(gate.limiter.counters, clock=lambda: 690.0))  # 1.5 min on
    assert answer(live, chat(KEYS["slow"]), later)[0] == 0  # 3 x 0.5 + 1 <= 3


def test_tokens_per_minute_counts_prompt_bytes_and_max_tokens_at_admission() -> None:
    clients = [client_entry for client_entry in clients_yaml() if client_entry["name"] == "slow"]
    clients[0]["limits"] = {"tokens_per_minute": 100}
    live = live_with(clients)
    gate = Admission(RateLimiter(LocalCounters(), clock=lambda: 600.0))
    # content-length 80 -> 20 prompt tokens, max_tokens 16: 36 a request; the third is over 100
    statuses = [answer(live, chat(KEYS["slow"]), gate)[0] for _ in range(3)]
    assert statuses == [0, 0, 429]


@pytest.mark.parametrize(
    ("path", "fields", "output"),
    [
        (b"/v1/chat/completions", {"max_tokens": 16}, 16),
        (b"/v1/chat/completions", {"max_tokens": -5}, 256),
        (b"/v1/chat/completions", {"max_completion_tokens": "x", "max_tokens": 7}, 7),
        (b"/v1/chat/completions", {"max_tokens": 1e300}, 10**12),
        (b"/v1/embeddings", {}, 0),
    ],
)
def test_the_token_limit_counts_the_output_tokens_routing_prices(
    path: bytes, fields: dict, output: int
) -> None:
    """One reading of the asked output (ext_proc.request.requested_max_tokens): a negative
    max_tokens once counted 0 here and 256 in routing, and embeddings 256 here and 0 there."""
    metadata = ext_proc_pb2.ProcessingRequest().metadata_context
    metadata.filter_metadata["gpu_router.request"].update(fields)
    assert estimated_tokens(80, metadata, path) == 80 // 4 + output


def test_the_sliding_window_weighs_the_previous_minute() -> None:
    assert retry_after_s(previous=0, current=3, limit=3, elapsed_s=10) is None
    assert retry_after_s(previous=0, current=4, limit=3, elapsed_s=10) == 50
    # 4 in the previous minute, 1 now, limit 3: admitted once 4 x (1 - t/60) + 1 <= 3, t = 30
    assert retry_after_s(previous=4, current=1, limit=3, elapsed_s=20) == pytest.approx(10)
    assert retry_after_s(previous=4, current=1, limit=3, elapsed_s=30) is None


def test_a_keyless_policy_leaves_the_gate_open() -> None:
    live = live_with([])
    assert answer(live, chat())[0] == 0


def ledger_row_of(**values: Any) -> LedgerRow:
    """A ledger row with `values`, every other column zero or empty."""
    zero = {int: 0, float: 0.0, bool: False, str: ""}
    types = get_type_hints(LedgerRow)
    return LedgerRow(**{f.name: values.get(f.name, zero[types[f.name]]) for f in fields(LedgerRow)})


def test_client_spend_is_a_rolling_window_read_back_from_the_ledger(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.db"
    now = 10_000_000.0
    writer = LedgerWriter(ledger)
    for age_s in (10, 1000, 4000):
        writer.add(ledger_row_of(at_unix_ms=int(now * 1000) - age_s * 1000, request_id=f"r{age_s}",
                                 cost_usd=0.1, client="capped"))
    writer.close()
    spend = ClientSpend(ledger, clock=lambda: now)
    spend.use_policy(load(clients_yaml()))
    assert spend.spent() == {"capped": pytest.approx(0.2)}  # the 4000 s old row is outside 1h
    spend.add("capped", int(now * 1000), 0.25)
    spend.add("search", int(now * 1000), 5.0)  # no budget: not tracked
    assert spend.spent() == {"capped": pytest.approx(0.45)}
    rows = {row["client"]: row for row in spend.rows()}
    assert list(rows) == ["search", "batchy", "capped", "slow"]  # declared, none seen but two
    assert rows["capped"]["requests"] == 1 and rows["capped"]["spent_usd"] == pytest.approx(0.45)
    assert rows["capped"]["remaining_usd"] == pytest.approx(0.05)
    assert rows["search"]["cost_usd"] == 5.0 and rows["search"]["remaining_usd"] is None


def test_an_open_edge_beyond_loopback_needs_clients_or_the_flag() -> None:
    open_config, keyed = load([]), load(clients_yaml())
    assert open_edge_refusal("127.0.0.1", open_config, False) is None
    assert open_edge_refusal("::1", open_config, False) is None
    refusal = open_edge_refusal("0.0.0.0", open_config, False)
    assert refusal is not None and "--allow-open-edge" in refusal
    assert open_edge_refusal("0.0.0.0", open_config, True) is None
    assert open_edge_refusal("0.0.0.0", keyed, False) is None


def test_with_clients_the_edge_does_not_fail_open_without_ext_proc() -> None:
    from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2 as filter_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    from control_plane.translate import EdgeSettings, translate

    def ext_proc_filter(config: Any) -> Any:
        listener = next(iter(translate(config, EdgeSettings(), {}).listeners.values()))
        manager = hcm_pb2.HttpConnectionManager()
        listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
        packed = next(f for f in manager.http_filters if "ext_proc" in f.name).typed_config
        processor = filter_pb2.ExternalProcessor()
        packed.Unpack(processor)
        return processor

    open_ = ext_proc_filter(load([]))
    assert open_.failure_mode_allow and open_.message_timeout.ToMilliseconds() == 200
    closed = ext_proc_filter(load(clients_yaml()))
    assert not closed.failure_mode_allow and closed.status_on_error.code == 503
    # Without failure_mode_allow a missed message timeout is the client's 504: a longer wait.
    assert closed.message_timeout.ToMilliseconds() == 1000


def test_up_refuses_an_open_edge_beyond_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["up", "--edge-host", "0.0.0.0", "--no-simulators"])  # the default policy: no clients
    assert exited.value.code == 2
    assert "--allow-open-edge" in capsys.readouterr().err


def test_keys_list_shows_budgets_spend_and_limits_never_a_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy, ledger = tmp_path / "policy.yaml", tmp_path / "ledger.db"
    policy.write_text(policy_text(clients_yaml()))
    writer = LedgerWriter(ledger)
    now_ms = int(time.time() * 1000)
    for index, (client, cost) in enumerate((("capped", 0.2), ("capped", 0.1), ("slow", 1.0))):
        writer.add(ledger_row_of(at_unix_ms=now_ms - 1000, request_id=f"r{index}",
                                 cost_usd=cost, client=client, status=200))
    writer.close()
    with pytest.raises(SystemExit) as exited:
        main(["keys", "list", "--policy", str(policy), "--ledger", str(ledger), "--format", "json"])
    assert exited.value.code == 0
    output = capsys.readouterr().out
    rows = {row["usage"]["client"]: row for row in json.loads(output)}
    assert list(rows) == ["search", "batchy", "capped", "slow"]
    assert rows["capped"]["budget_usd"] == 0.5 and rows["capped"]["window_s"] == 3600
    assert rows["capped"]["usage"]["spend_usd"] == pytest.approx(0.3)
    assert rows["capped"]["remaining_usd"] == pytest.approx(0.2)
    assert rows["slow"]["requests_per_minute"] == 3 and rows["slow"]["remaining_usd"] is None
    assert not any(key in output for key in KEYS.values())
    with pytest.raises(SystemExit):
        main(["report", "--by", "client", "--ledger", str(ledger), "--since", "1h"])
    assert "capped" in capsys.readouterr().out
