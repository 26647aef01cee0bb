"""The routing loop end to end: policy -> xDS -> real Envoy -> ext_proc -> simulated providers."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import yaml
from polling import eventually
from stack_harness import CLI, CLIENTS, Providers, Traffic, chat, post

from gpu_router.admin_token import ADMIN_TOKEN_FILE
from gpu_router.processes import http_get
from gpu_router.stack import Stack


def test_cost_first_picks_the_cheapest_fitting_provider(stack: Stack, providers: Providers) -> None:
    status, headers, body = chat(stack, "llama-3.1-8b", {"x-workload": "batch"})

    assert status == 200, body
    assert headers["x-gpu-router-provider"] == "vast"
    assert headers["x-gpu-router-reason"].startswith("cheapest")
    # vast's own id for the model reached vast: ext_proc rewrote the body.
    assert body["model"] == "llama3.1:8b"
    assert providers.stats("vast")["last_request"]["model"] == "llama3.1:8b"


def test_a_model_too_large_for_a_providers_gpus_is_never_sent_there(stack: Stack, providers: Providers) -> None:
    # vast lists mixtral-8x7b cheapest, on 24 GB RTX-4090s: cost-first must still skip it.
    served = set()
    for _ in range(5):
        status, headers, body = chat(stack, "mixtral-8x7b", {"x-workload": "batch"})
        assert status == 200, body
        served.add(headers["x-gpu-router-provider"])

    assert served == {"runpod"}
    assert providers.stats("vast")["requests"] == 0
    # runpod's base URL has a path: it is put in front of the request path.
    assert providers.stats("runpod")["last_request"]["path"] == "/openai/v1/chat/completions"


def test_strategy_header_overrides_the_policy(stack: Stack, providers: Providers) -> None:
    status, headers, _ = chat(stack, "llama-3.1-70b", {"x-gpu-router-strategy": "cost"})
    assert status == 200
    assert headers["x-gpu-router-provider"] == "coreweave"

    status, _, body = chat(stack, "llama-3.1-70b", {"x-gpu-router-strategy": "fastest-please"})
    assert status == 400
    assert "x-gpu-router-strategy" in body["error"]["message"]


def test_latency_first_follows_the_measured_ewma(stack: Stack, providers: Providers) -> None:
    for name in ("lambda", "coreweave", "vast"):
        providers.latency(name, 150)
    providers.latency("runpod", 5)

    def routed_to() -> str:
        status, headers, body = chat(stack, "llama-3.1-8b")
        assert status == 200, body
        return headers["x-gpu-router-provider"]

    eventually(lambda: all(routed_to() == "runpod" for _ in range(3)), "latency-first to settle on runpod")

    # runpod slows down: its EWMA rises with its own traffic until another provider is faster.
    providers.latency("runpod", 400)
    providers.latency("coreweave", 5)
    eventually(lambda: routed_to() == "coreweave", "latency-first to leave the slowed provider")


def test_model_in_header_is_routed_without_sending_the_body(stack: Stack, providers: Providers) -> None:
    edge = stack.edges[0]
    before = edge.admin.stats("http.edge.ext_proc.")
    headers = {"x-gpu-router-model": "llama-3.1-70b", "x-gpu-router-strategy": "cost"}
    status, response_headers, body = chat(stack, "llama-3.1-70b", headers)
    after = edge.admin.stats("http.edge.ext_proc.")

    assert status == 200, body
    assert response_headers["x-gpu-router-provider"] == "coreweave"
    sent = after["http.edge.ext_proc.stream_msgs_sent"] - before["http.edge.ext_proc.stream_msgs_sent"]
    assert sent == 1  # request headers only


def test_a_one_mebibyte_prompt_routes(stack: Stack, providers: Providers) -> None:
    prompt = "x" * (1024 * 1024 + 17)
    payload = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4}

    status, headers, body = post(f"{stack.url}/v1/chat/completions", payload, {"x-workload": "batch"})

    assert status == 200, body
    assert headers["x-gpu-router-provider"] == "vast"
    assert providers.stats("vast")["last_request"]["body_bytes"] > 1024 * 1024


def test_bad_requests_get_openai_style_errors(stack: Stack, providers: Providers) -> None:
    url = f"{stack.url}/v1/chat/completions"

    status, _, body = post(url, None, raw=b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]

    status, _, body = post(url, {"messages": []})
    assert status == 400 and "model" in body["error"]["message"]

    status, _, body = post(url, {"model": "gpt-17", "messages": []})
    assert status == 404 and body["error"]["code"] == "model_not_found"

    assert sum(providers.stats(name)["requests"] for name in providers.urls) == 0


def test_models_are_listed_through_the_edge(stack: Stack) -> None:
    status, body = http_get(f"{stack.url}/v1/models")
    names = {model["id"] for model in json.loads(body)["data"]}

    assert status == 200
    assert names == {"llama-3.1-8b", "mixtral-8x7b", "llama-3.1-70b", "bge-large"}


def test_gpu_router_health_shows_what_the_fleet_measured(stack: Stack, providers: Providers) -> None:
    for _ in range(3):
        assert chat(stack, "llama-3.1-8b", {"x-workload": "batch"})[0] == 200
    command = [*CLI, "health", "--control-plane", stack.control_url(""),
               "--admin-token-file", str(stack.certs / ADMIN_TOKEN_FILE)]

    def vast_rows() -> list[str]:
        table = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        return [line.split() for line in table.splitlines() if line.startswith("vast ")]

    rows = eventually(lambda: [r for r in vast_rows() if r[1] == "llama-3.1-8b" and int(r[6]) >= 3],
                      "health to count vast's requests")
    assert rows[0][2] == "healthy"
    assert rows[0][9] == "-"  # in flight: known per provider, not per model
    # Per provider it is as of the edge's last load report (each second): 0 once all have ended.
    eventually(lambda: [r[9] for r in vast_rows() if r[1] == "*"] == ["0"], "vast's provider row, none in flight")


def test_envoys_own_log_shows_each_decision(stack: Stack, providers: Providers) -> None:
    status, _, _ = chat(stack, "llama-3.1-8b", {"x-workload": "batch", "x-request-id": "seen-in-envoy-log"})
    assert status == 200
    log = stack.edges[0].process.log_path

    def decision() -> dict | None:
        for line in log.read_text(errors="replace").splitlines():
            if '"seen-in-envoy-log"' in line:
                return json.loads(line)
        return None

    entry = eventually(decision, "the decision line on Envoy's stdout")
    assert (entry["served_by"], entry["provider"], entry["policy"]) == ("vast", "vast", "batch")
    assert entry["reason"].startswith("cheapest") and "vast=" in entry["candidates"]


def test_requests_in_flight_show_in_fleet_health(stack: Stack, providers: Providers) -> None:
    """Envoy's load reports reach the control plane: three slow requests show while they run."""
    providers.latency("vast", 2500)

    def in_flight() -> dict[str, int]:
        health = json.loads(stack.control_get("/v1/health")[1])
        return {name: view["in_flight"] for name, view in health["providers"].items() if view["in_flight"]}

    with ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(chat, stack, "llama-3.1-8b", {"x-workload": "batch"}) for _ in range(3)]
        eventually(lambda: in_flight() == {"vast": 3}, "three requests in flight at vast")
        served = [future.result()[1]["x-gpu-router-provider"] for future in slow]

    assert served == ["vast"] * 3
    eventually(lambda: in_flight() == {}, "the finished requests to leave the in-flight count")


def test_clients_over_a_providers_cap_wait_then_go_to_the_next_and_none_gets_an_error(
    stack: Stack, providers: Providers
) -> None:
    """Envoy never retries a request a circuit breaker refused: a cap on requests answered a
    503 to each client over vast's (cost-first's pick, max_concurrency 32 in the default
    policy) while the others idled. The cap is now on connections, what is over it waits, and
    once the edge's load report shows vast at its cap, ext_proc tries it after the others."""
    policy = yaml.safe_load(stack.policy.read_text())
    cap = next(p["max_concurrency"] for p in policy["providers"] if p["name"] == "vast")
    assert CLIENTS > cap
    edge = stack.edges[0]
    overflows = "cluster.vast.upstream_cx_overflow"
    before = edge.admin.stats(overflows).get(overflows, 0)
    providers.reset_all()
    providers.latency("vast", 300)  # every client's request overlaps the others'

    def spilled(traffic: Traffic) -> bool:
        return any(e.provider == "runpod" and "vast at max_concurrency" in e.reason
                   for e in list(traffic.exchanges))

    try:
        with Traffic(stack, "llama-3.1-8b", {"x-workload": "batch"}, threads=CLIENTS) as traffic:
            eventually(lambda: spilled(traffic), "a request over vast's cap sent to runpod")
        vast = providers.stats("vast")
    finally:
        providers.reset_all()
    assert traffic.failures() == {}, traffic.failed
    # A worker thread's pool with no connection may open one over the cap (provider_cap.py).
    threads = edge.admin.server_info()["command_line_options"]["concurrency"]
    assert cap <= vast["peak_in_flight"] <= cap + threads, vast
    stats = edge.admin.stats("cluster.vast.")
    assert stats["cluster.vast.upstream_rq_pending_overflow"] == 0, stats
    # The first requests, before any load report, met the cap and waited.
    assert stats[overflows] > before, stats
    # Once the load is gone, so is the cap (the next reports), for whatever runs next.
    eventually(lambda: json.loads(stack.control_get("/v1/health")[1])["at_cap"] == {},
               "the control plane to see vast below its cap again")
