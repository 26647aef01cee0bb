"""Policy YAML -> validated RoutingConfig, with every problem reported at once.

The file is composed into YAML nodes first (yaml_nodes), so each value keeps the line it
came from; validation then walks plain values section by section (names, providers,
policies, with checker's typed readers) and names every issue as
"<file>:<line>: <key.path>: <message>". Credentials are not resolved here (see
credentials.py): a file must validate on a machine that has no keys.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Any

from control_plane.policy.checker import MISSING, Checker
from control_plane.policy.clients import read_clients
from control_plane.policy.issues import KeyPath, PolicyError, PolicyIssue
from control_plane.policy.model import Failover, RoutingConfig
from control_plane.policy.names import Names, read_model
from control_plane.policy.policies import check_catch_all, check_hardware_fit, read_policy
from control_plane.policy.providers import read_provider
from control_plane.policy.yaml_nodes import compose

__all__ = ["PolicyError", "PolicyIssue", "default_policy_path", "load_policy_file",
           "load_policy_text"]

SCHEMA_VERSION = 1


def default_policy_path() -> Path:
    """The embedded default policy (simulated providers on 127.0.0.1)."""
    return Path(str(resources.files("control_plane.policy").joinpath("default.yaml")))


def load_policy_file(path: str | Path) -> RoutingConfig:
    """Read and validate a policy file; raises PolicyError listing every issue."""
    source = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(
            [PolicyIssue(source=source, key_path="", line=0, message=f"cannot read: {exc}")]
        ) from exc
    return load_policy_text(text, source)


def load_policy_text(text: str, source: str) -> RoutingConfig:
    """Validate policy YAML text; `source` names it in issues and RoutingConfig.source."""
    raw, lines, structural = compose(text, source)
    check = Checker(source, lines)
    check.issues.extend(structural)
    config = _routing_config(check, raw, source, _content_version(text))
    if check.issues or config is None:
        raise PolicyError(sorted(check.issues, key=lambda issue: issue.line))
    return config


def _content_version(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _routing_config(check: Checker, raw: Any, source: str, version: str) -> RoutingConfig | None:
    top = check.mapping(raw, (), required=("version", "providers", "models", "policies"),
                        optional=("failover", "clients"))
    if top is None:
        return None
    schema = check.integer(top.get("version", MISSING), ("version",), minimum=0)
    if schema is not None and schema != SCHEMA_VERSION:
        check.fail(("version",),
                   f"unsupported version {schema}; this router reads version {SCHEMA_VERSION}")
    names = Names(canonical={}, first_seen={}, models={}, providers={}, policies={},
                  served=set())
    models = check.items(top.get("models", MISSING), ("models",),
                         lambda item, path: read_model(check, item, path, names), non_empty=True)
    providers = check.items(top.get("providers", MISSING), ("providers",),
                            lambda item, path: read_provider(check, item, path, names),
                            non_empty=True)
    if isinstance(top.get("providers"), list):
        for name, path in names.models.items():
            if name not in names.served:
                check.fail(path, f"model '{name}' is served by no provider "
                                 "(no provider lists it under models)")
    policies = check.items(top.get("policies", MISSING), ("policies",),
                           lambda item, path: read_policy(check, item, path, names), non_empty=True)
    if policies is not None:
        check_catch_all(check, policies)
    failover = _failover(check, top.get("failover", {}), ("failover",))
    clients = read_clients(check, top.get("clients", []), ("clients",), names)
    if models is None or providers is None:
        return None
    check_hardware_fit(check, models, providers, names)
    if policies is None or failover is None or clients is None:
        return None
    return RoutingConfig(providers=tuple(providers), models=tuple(models), failover=failover,
                         policies=tuple(policies), clients=tuple(clients), source=source,
                         version=version)


_REPLACED_FAILOVER_KEYS = ("retry_budget_percent", "min_retry_concurrency")
_REPLACED_BECAUSE = (
    "no longer read, failover.max_retries_in_flight replaced it: Envoy's retry budget is a share "
    "of the failing provider's own requests in flight, so a provider that fails fast refused most "
    "retries (delete the key; max_retries_in_flight defaults to the sum of the providers' "
    "max_concurrency)"
)


def _failover(check: Checker, raw: Any, path: KeyPath) -> Failover | None:
    """The edge-wide retry cap; the retry-budget keys it replaced are named as such, not as
    unknown keys, so an operator upgrading knows what to edit."""
    given: dict[str, Any] | None = check.typed(raw, path, dict, "a mapping")
    if given is None:
        return None
    replaced = [key for key in _REPLACED_FAILOVER_KEYS if key in given]
    for key in replaced:
        check.fail((*path, key), _REPLACED_BECAUSE)
    current = check.mapping({key: value for key, value in given.items() if key not in replaced},
                            path, optional=("max_retries_in_flight",))
    if current is None or replaced:
        return None
    if "max_retries_in_flight" not in current:
        return Failover()
    cap = check.integer(current["max_retries_in_flight"], (*path, "max_retries_in_flight"),
                        minimum=1)
    return None if cap is None else Failover(max_retries_in_flight=cap)
