"""The clients section: who may use the edge (by the SHA-256 of their key), their budget, rate
limits, model allow-list and forced routing policy.

The policy never holds a key: `gpu-router keys new` prints one and the hash to put here.
"""

from __future__ import annotations

import re
from typing import Any

from control_plane.policy.checker import MISSING, Checker
from control_plane.policy.issues import KeyPath
from control_plane.policy.model import Budget, Client, Limits
from control_plane.policy.names import Names, known_model

CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
WINDOW = re.compile(r"^(\d+)([smhd])$")
_WINDOW_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_WINDOW_S = 366 * 86400


def parse_window(text: str) -> int | None:
    """"30d", "24h", "15m", "90s" in seconds; None when not such a duration."""
    match = WINDOW.fullmatch(text)
    return None if match is None else int(match.group(1)) * _WINDOW_SECONDS[match.group(2)]


def read_clients(check: Checker, raw: Any, path: KeyPath, names: Names) -> list[Client] | None:
    """Every client, after the policies were read (a client may name one); names and key
    hashes are unique."""
    seen_names: dict[str, KeyPath] = {}
    seen_hashes: dict[str, KeyPath] = {}
    return check.items(raw, path, lambda item, item_path: _client(
        check, item, item_path, names, seen_names, seen_hashes))


def _client(check: Checker, raw: Any, path: KeyPath, names: Names,
            seen_names: dict[str, KeyPath], seen_hashes: dict[str, KeyPath]) -> Client | None:
    fields = check.mapping(raw, path, required=("name", "key_sha256"),
                           optional=("budget", "limits", "models", "policy"))
    if fields is None:
        return None
    name = check.string(fields.get("name", MISSING), (*path, "name"), pattern=CLIENT_NAME,
                        pattern_hint="letters, digits, '.', '-' or '_'")
    if name is not None:
        check.unique(seen_names, name, (*path, "name"), "client name")
    key_hash = check.string(fields.get("key_sha256", MISSING), (*path, "key_sha256"),
                            pattern=SHA256_HEX,
                            pattern_hint="64 lower-case hex digits (gpu-router keys new prints it)")
    if key_hash is not None:
        check.unique(seen_hashes, key_hash, (*path, "key_sha256"), "key_sha256")
    budget = _budget(check, fields["budget"], (*path, "budget")) if "budget" in fields else None
    limits = _limits(check, fields.get("limits", {}), (*path, "limits"))
    allowed: dict[str, KeyPath] = {}

    def read_model(item: Any, item_path: KeyPath) -> str | None:
        model = known_model(check, check.string(item, item_path), item_path, names)
        if model is not None:
            check.unique(allowed, model, item_path, "model")
        return model

    models = check.items(fields.get("models", []), (*path, "models"), read_model)
    policy = _policy(check, fields["policy"], (*path, "policy"), names) if "policy" in fields else None
    if (name is None or key_hash is None or limits is None or models is None
            or ("budget" in fields and budget is None)
            or ("policy" in fields and policy is None)):
        return None
    return Client(name=name, key_sha256=key_hash, budget=budget, limits=limits,
                  models=tuple(models), policy=policy)


def _budget(check: Checker, raw: Any, path: KeyPath) -> Budget | None:
    fields = check.mapping(raw, path, required=("usd", "per"))
    if fields is None:
        return None
    usd = check.number(fields.get("usd", MISSING), (*path, "usd"))
    per = check.string(fields.get("per", MISSING), (*path, "per"), pattern=WINDOW,
                       pattern_hint="a duration such as 1h, 24h, 7d or 30d")
    window_s = None if per is None else parse_window(per)
    if window_s is not None and not 0 < window_s <= _MAX_WINDOW_S:
        check.fail((*path, "per"), f"must be between 1s and 366d, got {per}")
        window_s = None
    if usd is None or window_s is None:
        return None
    return Budget(usd=usd, window_s=window_s)


def _limits(check: Checker, raw: Any, path: KeyPath) -> Limits | None:
    fields = check.mapping(raw, path, optional=("requests_per_minute", "tokens_per_minute"))
    if fields is None:
        return None
    rpm = check.integer(fields.get("requests_per_minute", 0), (*path, "requests_per_minute"),
                        minimum=0)
    tpm = check.integer(fields.get("tokens_per_minute", 0), (*path, "tokens_per_minute"),
                        minimum=0)
    if rpm is None or tpm is None:
        return None
    return Limits(requests_per_minute=rpm, tokens_per_minute=tpm)


def _policy(check: Checker, raw: Any, path: KeyPath, names: Names) -> str | None:
    name = check.string(raw, path)
    if name is not None and name not in names.policies:
        check.fail(path, f"unknown policy '{name}'; policies: {', '.join(names.policies)}")
        return None
    return name
