"""Driving the real stack from tests: policies on free ports, the simulators' control API, requests."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import yaml

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
    """A stack on free ports whose ledger and audit log live in `log_dir`."""
    accounting = ["--ledger", str(log_dir / "ledger.db"), "--audit-log", str(log_dir / "audit.jsonl")]
    return Stack(policy=policy, log_dir=log_dir, ports=StackPorts.free(), accounting=accounting,
                 **kwargs).start()



class Providers:
    """The simulated providers of a running stack, by name."""

    def __init__(self, policy: Path) -> None:
        document = yaml.safe_load(policy.read_text())
        origins = {p["name"]: urllib.parse.urlsplit(p["base_url"]) for p in document["providers"]}
        self.urls = {name: f"{url.scheme}://{url.netloc}" for name, url in origins.items()}

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


class Edge(Protocol):
    """A whole stack (its first node) or one EdgeHandle: anything with the edge's URL."""

    @property
    def url(self) -> str: ...


def chat(edge: Edge, model: str, headers: dict[str, str] | None = None, **extra: Any):
    payload = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, **extra}
    return post(f"{edge.url}/v1/chat/completions", payload, headers)

class Traffic:
    """Requests sent back to back from a few threads until stopped; every outcome counted."""

    def __init__(self, edges: Edge | list[Edge], model: str, headers: dict[str, str],
                 threads: int = 4) -> None:
        self.edges = edges if isinstance(edges, list) else [edges]
        self.model, self.headers = model, headers
        self.outcomes: Counter[tuple[int, str]] = Counter()
        self.failed: list[tuple[str, str, int, dict[str, str], dict]] = []
        """The first failed requests in full (when, edge, status, headers, body), to say why."""
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(self.edges[i % len(self.edges)],),
                                         daemon=True) for i in range(threads)]

    def run(self, edge: Edge) -> None:
        while not self.stopping.is_set():
            status, headers, body = chat(edge, self.model, self.headers)
            with self.lock:
                self.outcomes[(status, headers.get("x-gpu-router-provider", ""))] += 1
                if status != 200 and len(self.failed) < 10:
                    self.failed.append((time.strftime("%H:%M:%S"), edge.url, status, headers, body))

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def failures(self) -> dict[tuple[int, str], int]:
        return {key: n for key, n in self.outcomes.items() if key[0] != 200}

    def count(self, provider: str) -> int:
        with self.lock:
            return sum(n for (status, name), n in self.outcomes.items() if name == provider and status == 200)
