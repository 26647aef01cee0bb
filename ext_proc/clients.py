"""Who may use the edge: the RoutingPolicy's clients, indexed by the SHA-256 of their key.

Built once per policy version next to the routing table, so a request costs one hash and one
dict lookup. The table never holds a key, only hashes; the key itself arrives in the request's
Authorization (Bearer) or x-api-key header and never goes further than this process: the
provider clusters' upstream filters drop both headers and write the provider's own credential.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2

from ext_proc.routing_table import PolicyRule, RoutingTable, RoutingTableError
from gpu_router.api.v1 import clients_pb2

KEY_HEADERS = (b"authorization", b"x-api-key")
_BEARER = b"bearer "


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientRule:
    """One client as a request needs it."""

    name: str
    budget_usd: float | None
    """None: no budget."""
    requests_per_minute: int
    """0: no limit."""
    tokens_per_minute: int
    models: frozenset[str]
    """Canonical names allowed; empty: every model."""
    policy: PolicyRule | None
    """The routing policy every request of this client uses; None: matched as usual."""

    @property
    def limited(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)

    def for_model(self, model: str) -> PolicyRule | ext_proc_pb2.ProcessingResponse | None:
        """For a request of `model` (canonical): the 403 when the allow-list leaves it out,
        else the forced policy (None: the usual match decides)."""
        if self.models and model not in self.models:
            from ext_proc.request import error_response  # request.py imports this module's users

            return error_response(
                403,
                f"client {self.name!r} may not use model {model!r}",
                kind="invalid_request_error",
                code="model_not_allowed",
                param="model",
            )
        return self.policy


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientTable:
    by_key_hash: Mapping[str, ClientRule]

    @property
    def enabled(self) -> bool:
        """Clients are declared: every request needs a known key."""
        return bool(self.by_key_hash)

    def lookup(self, key: bytes | None) -> ClientRule | None:
        if not key:
            return None
        return self.by_key_hash.get(hashlib.sha256(key).hexdigest())


NO_CLIENTS = ClientTable(by_key_hash=MappingProxyType({}))


def presented_key(headers: Iterable[tuple[str, bytes]]) -> bytes | None:
    """The key a client sent, the way OpenAI-style SDKs send it: `Authorization: Bearer KEY`,
    else `x-api-key: KEY`. Raw bytes, so a non-UTF-8 header is simply an unknown key."""
    found: dict[str, bytes] = {}
    for name, value in headers:
        if name == "authorization" or name == "x-api-key":
            found.setdefault(name, value)
    bearer = found.get("authorization")
    if bearer is not None and bearer[:7].lower() == _BEARER:
        return bearer[7:].strip()
    key = found.get("x-api-key")
    return None if key is None else key.strip()


def build_client_table(clients: Iterable[clients_pb2.Client], table: RoutingTable) -> ClientTable:
    """RoutingTableError when a client names a model or policy the table lacks, or two clients
    share a name or key hash (the control plane validated this; a replica NACKs otherwise)."""
    policies = {policy.name: policy for policy in table.policies}
    by_hash: dict[str, ClientRule] = {}
    names: set[str] = set()
    for client in clients:
        if client.name in names or client.key_sha256 in by_hash:
            raise RoutingTableError(f"client {client.name!r} repeats a name or key hash")
        unknown = [m for m in client.models if m not in table.models]
        if unknown:
            raise RoutingTableError(f"client {client.name!r} allows unknown models {unknown}")
        if client.policy and client.policy not in policies:
            raise RoutingTableError(f"client {client.name!r} names unknown policy "
                                    f"{client.policy!r}")
        names.add(client.name)
        by_hash[client.key_sha256.lower()] = ClientRule(
            name=client.name,
            budget_usd=client.budget_usd if client.HasField("budget_usd") else None,
            requests_per_minute=client.requests_per_minute,
            tokens_per_minute=client.tokens_per_minute,
            models=frozenset(client.models),
            policy=policies[client.policy] if client.policy else None,
        )
    return ClientTable(by_key_hash=MappingProxyType(by_hash))


def spent_by_client(snapshot: clients_pb2.ClientSpendSnapshot) -> Mapping[str, float]:
    return MappingProxyType({entry.client: entry.spent_usd for entry in snapshot.clients})
