"""Driving the real stack from tests: policies on free ports, the simulators' control API, requests."""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

import yaml

from control_plane.policy.load import default_policy_path
from gpu_router.processes import free_port
from gpu_router.stack import Stack, StackPorts

CLIENTS = 64
MODEL = "llama-3.1-8b"
BATCH = {"x-workload": "batch"}
"""Cost-first: of the default policy's providers, the cheapest that fits wins."""
"""Concurrent clients in a test of a fault or a change under load: as production has, not a few."""
CLI = [sys.executable, "-c", "from gpu_router.cli import main; main()"]
"""The `gpu-router` command, as this interpreter runs it."""


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


@contextmanager
def frozen(stack: Stack, name: str) -> Iterator[None]:
    """SIGSTOP a process of the stack and all its workers (its group); SIGCONT whatever happens."""
    group = stack.processes[name].pid
    os.killpg(group, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(group, signal.SIGCONT)


def replace_file(path: Path, text: str) -> None:
    """Write `text` whole, by renaming a new file over `path` (as editors and config managers
    do): a watcher reading mid-write would see a half file, rightly reject it ("the document
    is empty"), and race a test's check of the edit's own outcome."""
    draft = path.with_name(f".{path.name}.new")
    draft.write_text(text)
    os.replace(draft, path)


def policy_version(stack: Stack) -> str:
    """The version of the policy the control plane serves (/v1/policy)."""
    return json.loads(stack.control_get("/v1/policy")[1])["version"]


def start_stack(policy: Path, log_dir: Path, **kwargs: Any) -> Stack:
    """A stack on free ports whose ledger lives in `log_dir` (the audit trail is read from it:
    audit_trail)."""
    accounting = ["--ledger", str(log_dir / "ledger.db"), "--edge-decision-log"]
    return Stack(policy=policy, log_dir=log_dir, ports=StackPorts.free(), accounting=accounting,
                 **kwargs).start()


@contextmanager
def default_stack(directory: Path, edit: Callable[[dict], None] | None = None,
                  **kwargs: Any) -> Iterator[Stack]:
    """start_stack in `directory` on the embedded default policy moved to free ports (and edited
    by `edit`), stopped on leaving."""
    policy = policy_on_free_ports(default_policy_path(), directory / "policy.yaml", edit)
    running = start_stack(policy, directory / "logs", **kwargs)
    try:
        yield running
    finally:
        running.stop()



def audit_trail(stack: Stack) -> list[dict[str, Any]]:
    """The stack's audit trail of the last hour, as `gpu-router audit` prints it."""
    printed = subprocess.run(
        [*CLI, "audit", "--ledger", str(stack.log_dir / "ledger.db"), "--since", "1h"],
        capture_output=True, text=True, check=True, timeout=60).stdout
    return [json.loads(line) for line in printed.splitlines()]


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
         raw: bytes | None = None, timeout: float = 30,
         context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], Any]:
    """POST JSON; (status, lower-cased headers, body) whatever the status. The body is decoded
    JSON, or text when it is not JSON (Envoy's own 503 and 504 bodies are plain text).
    Transport failures (reset, refused, timeout, short read) raise. `context`: the TLS client
    context for an https edge (tests/edge_tls_fixtures.py client_context)."""
    body = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            status, head, data = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        with error:
            status, head, data = error.code, error.headers, error.read()
    return status, {k.lower(): v for k, v in head.items()}, decode(data)


def decode(data: bytes) -> Any:
    """JSON if it parses, else the text: a failure's body must never hide the failure."""
    if not data:
        return {}
    try:
        return json.loads(data)
    except ValueError:
        return data.decode(errors="replace")


class Edge(Protocol):
    """A whole stack (its first node) or one EdgeHandle: anything with the edge's URL."""

    @property
    def url(self) -> str: ...


def chat(edge: Edge, model: str, headers: dict[str, str] | None = None, timeout: float = 30,
         context: ssl.SSLContext | None = None, **extra: Any) -> tuple[int, dict[str, str], Any]:
    payload = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, **extra}
    return post(f"{edge.url}/v1/chat/completions", payload, headers, timeout=timeout,
                context=context)


TRANSPORT_FAILURES = ("timeout", "refused", "reset", "incomplete")
"""The keys Traffic counts a request under when no HTTP status came back."""


def reason(stack: Stack) -> str:
    """Why the edge routed a batch chat request as it did (x-gpu-router-reason)."""
    status, headers, body = chat(stack, MODEL, BATCH)
    assert status == 200, body  # served either way: by ext_proc's decision or the fallback
    return headers["x-gpu-router-reason"]


def refusals(stack: Stack) -> list[dict]:
    """The peers the control plane refused so far (its `peer_refused` log lines)."""
    lines = stack.processes["control-plane"].log_path.read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    return [entry for entry in entries if entry.get("event") == "peer_refused"]


def transport_failure(error: BaseException) -> str | None:
    """Which transport failure `error` is, or None when it is something else (a bug)."""
    if isinstance(error, urllib.error.URLError) and isinstance(error.reason, BaseException):
        error = error.reason
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, ConnectionError):  # reset, aborted, broken pipe, RemoteDisconnected
        return "reset"
    if isinstance(error, http.client.HTTPException):
        return "incomplete"  # IncompleteRead, BadStatusLine: the answer was cut short
    return None  # e.g. URLError("unknown url type"): the test's mistake, not the server's


@dataclass(frozen=True)
class Exchange:
    """One request Traffic sent: its HTTP status, or a transport failure's name instead."""

    when: str
    edge: str
    status: int | str
    latency_s: float
    sent_at: float
    """time.monotonic() when the request was sent."""
    provider: str = ""
    reason: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: Any = None

    @property
    def ok(self) -> bool:
        return isinstance(self.status, int) and 200 <= self.status < 300


class Traffic:
    """Requests sent back to back from a few threads until stopped; every outcome counted.

    Any non-2xx status and any transport failure (reset, refused, timeout, short read) is a
    failure; a client thread dying of anything else fails the test on exit."""

    KEPT = 10
    """How many failed exchanges are kept in full, to say why."""

    def __init__(self, edges: Edge | list[Edge], model: str, headers: dict[str, str],
                 threads: int = 4, timeout: float = 30) -> None:
        self.edges = edges if isinstance(edges, list) else [edges]
        self.model, self.headers, self.timeout = model, headers, timeout
        self.outcomes: Counter[tuple[int | str, str]] = Counter()
        """(status or transport failure, provider header) -> requests."""
        self.exchanges: list[Exchange] = []
        """Every request in the order it finished: latency, provider and reason headers."""
        self.failed: list[Exchange] = []
        """The first failed requests in full."""
        self.crashes: list[BaseException] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(self.edges[i % len(self.edges)],),
                                         name=f"traffic-{i}", daemon=True) for i in range(threads)]

    def send(self, edge: Edge) -> Exchange:
        start = time.monotonic()
        when = time.strftime("%H:%M:%S")
        try:
            status, headers, body = chat(edge, self.model, self.headers, timeout=self.timeout)
        except Exception as error:
            failure = transport_failure(error)
            if failure is None:
                raise
            return Exchange(when, edge.url, failure, time.monotonic() - start, start,
                            body=repr(error))
        return Exchange(when, edge.url, status, time.monotonic() - start, start,
                        headers.get("x-gpu-router-provider", ""), headers.get("x-gpu-router-reason", ""),
                        tuple(sorted(headers.items())), body)

    def run(self, edge: Edge) -> None:
        try:
            while not self.stopping.is_set():
                exchange = self.send(edge)
                with self.lock:
                    self.exchanges.append(exchange)
                    self.outcomes[(exchange.status, exchange.provider)] += 1
                    if not exchange.ok and len(self.failed) < self.KEPT:
                        self.failed.append(exchange)
        except Exception as error:  # noqa: BLE001 -- a client that dies silently hides failures
            with self.lock:
                self.crashes.append(error)

    def __enter__(self) -> Self:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=self.timeout + 30)
        stuck = [thread.name for thread in self.threads if thread.is_alive()]
        if stuck:
            raise TrafficClientDied(f"traffic clients never finished: {stuck}")
        self.check_clients()

    def check_clients(self) -> None:
        """Raise if a client thread died: its requests from then on would go uncounted."""
        with self.lock:
            crashes = list(self.crashes)
        if crashes:
            raise TrafficClientDied(f"{len(crashes)} traffic client(s) died: {crashes!r}") from crashes[0]

    def failures(self) -> dict[tuple[int | str, str], int]:
        """Failed requests by (status or transport failure, provider); raises if a client died."""
        self.check_clients()
        with self.lock:
            return {key: n for key, n in self.outcomes.items()
                    if not (isinstance(key[0], int) and 200 <= key[0] < 300)}

    def count(self, provider: str) -> int:
        with self.lock:
            return sum(n for (status, name), n in self.outcomes.items()
                       if name == provider and isinstance(status, int) and 200 <= status < 300)

    def total(self) -> int:
        with self.lock:
            return len(self.exchanges)

    def sent_after(self, moment: float) -> list[Exchange]:
        """The finished requests sent after `moment` (time.monotonic()). Not the last ones to
        finish: a slow request sent before it may finish after many sent since."""
        with self.lock:
            return [exchange for exchange in self.exchanges if exchange.sent_at > moment]


class TrafficClientDied(RuntimeError):
    """A Traffic client thread ended on an error that is not a request's failure."""
