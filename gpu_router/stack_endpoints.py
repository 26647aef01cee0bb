"""Where a stack's processes listen: its ports, a handle on each running edge node, and the
control plane's admin API as the stack reaches it."""

from __future__ import annotations

import json
import ssl
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_router.admin_token import bearer
from gpu_router.processes import (
    EnvoyAdmin,
    ManagedProcess,
    ProcessError,
    free_port,
    http_get,
    pinned_context,
)
from gpu_router.xds_status import policy_holders


@dataclass(frozen=True, slots=True, kw_only=True)
class StackPorts:
    edge: int = 10000
    """Edge listener of the first Envoy node (the others get free ports)."""
    admin: int = 9901
    """Admin port of the first Envoy node (the others get free ports)."""
    xds: int = 18000
    ext_proc: int = 50051
    """Port of the first ext_proc replica (the others get free ports)."""
    control_http: int = 8080

    @classmethod
    def free(cls) -> StackPorts:
        return cls(
            edge=free_port(),
            admin=free_port(),
            xds=free_port(),
            ext_proc=free_port(),
            control_http=free_port(),
        )


_OWN_EDGE_TLS = ssl.create_default_context()
"""How the stack asks its own edge on loopback whether it routes: its readiness, not its
identity (the operator's certificate may name a public host and chain to any CA)."""
_OWN_EDGE_TLS.check_hostname, _OWN_EDGE_TLS.verify_mode = False, ssl.CERT_NONE


@dataclass(frozen=True, slots=True)
class EdgeHandle:
    """One running Envoy edge node."""

    node_id: str
    edge_port: int
    admin: EnvoyAdmin
    process: ManagedProcess
    scheme: str = "http"
    """https when the edge serves TLS (Stack.edge_tls)."""

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.edge_port}"

    def serves_models(self) -> bool:
        """Whether the node routes: it answers /v1/models with models (from ext_proc)."""
        status, body = http_get(f"{self.url}/v1/models",
                                context=None if self.scheme == "http" else _OWN_EDGE_TLS)
        return status == 200 and bool(json.loads(body).get("data"))


def admin_pin(started_with: bytes, certificate: Path) -> ssl.SSLContext:
    """The admin API's certificates a stack accepts: the one the control plane started with and
    the file's now, since it serves a renewed pair from its next poll of the files on (one it
    refuses, it never serves)."""
    try:
        return pinned_context(started_with, certificate.read_bytes())
    except (OSError, ValueError):  # the file in the middle of its renewal
        return pinned_context(started_with)


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlPlaneApi:
    """The control plane's admin API on loopback, with its admin token: over HTTPS to the
    certificates `pinned` accepts (admin_pin), when it serves one."""

    port: int
    token: str = field(repr=False)
    pinned: ssl.SSLContext | None = None

    def url(self, path: str) -> str:
        scheme = "http" if self.pinned is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> tuple[int, bytes]:
        return http_get(self.url(path), headers=bearer(self.token), context=self.pinned)

    def new_policy_holders(self, workers: int) -> Callable[[], bool]:
        """Whether `workers` ext_proc nodes that were not connected now hold the current policy
        (a replica (re)starting with that many workers)."""
        try:
            known = policy_holders(self.xds_nodes())
        except (OSError, ProcessError):
            known = set()
        return lambda: len(policy_holders(self.xds_nodes()) - known) >= workers

    def healthy(self) -> bool:
        """/healthz answers; ProcessError when the certificate served is not the pinned one (a
        start would otherwise wait for it until its timeout)."""
        try:
            return self.get("/healthz")[0] == 200
        except urllib.error.URLError as error:
            if isinstance(error.reason, ssl.SSLCertVerificationError):
                raise ProcessError(f"the control plane's admin API: {error.reason}") from None
            raise

    def xds_nodes(self) -> list[dict[str, Any]]:
        """Every connected node as the control plane sees it (GET /v1/xds)."""
        status, body = self.get("/v1/xds")
        if status != 200:
            raise ProcessError(f"control plane /v1/xds answered {status}: {body[:200]!r}")
        nodes: list[dict[str, Any]] = json.loads(body)
        return nodes
