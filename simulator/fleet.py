"""Which providers to simulate: read from a policy file, or named ad hoc on the command line.

The policy YAML is read directly (not through control_plane, which is another deployable): only
providers[].name, base_url, health_check_path and models[].id (default: models[].name) matter here.
A provider is simulated when its base_url is plain http on 127.0.0.1 or localhost, or, with
any_host (Compose, where base URLs name the simulator's service), plain http on any host.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from simulator.profiles import GENERIC_PROFILE, profile_for
from simulator.server import SimSpec

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
_PROVIDER_ARG = re.compile(r"^(?P<name>[a-z][a-z0-9_-]*)=(?P<port>\d{1,5})$")


class FleetError(ValueError):
    """A policy file or command line that does not say which providers to simulate."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Fleet:
    specs: tuple[SimSpec, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    """(provider, why it is not simulated)."""


def default_policy_path() -> Path:
    """The embedded default policy, found as package data of control_plane.policy."""
    return Path(str(importlib.resources.files("control_plane.policy") / "default.yaml"))


def _field(mapping: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = mapping.get(key, default)
    if not isinstance(value, str) or not value:
        raise FleetError(f"{where}.{key} must be a non-empty string, got {value!r}")
    return value


def _model_ids(provider: dict[str, Any], where: str) -> tuple[str, ...]:
    models = provider.get("models")
    if not isinstance(models, list) or not models:
        raise FleetError(f"{where}.models must be a non-empty list")
    ids: dict[str, None] = {}
    for index, offering in enumerate(models):
        spot = f"{where}.models[{index}]"
        if not isinstance(offering, dict):
            raise FleetError(f"{spot} must be a mapping")
        ids[_field(offering, "id", spot, default=offering.get("name"))] = None
    return tuple(ids)


def fleet_from_policy(document: object, *, source: str, any_host: bool = False) -> Fleet:
    """The providers of a parsed policy document that can be simulated on this machine
    (`any_host`: whatever host their base_url names)."""
    providers = document.get("providers") if isinstance(document, dict) else None
    if not isinstance(providers, list):
        raise FleetError(f"{source}: providers must be a list")
    specs: list[SimSpec] = []
    skipped: list[tuple[str, str]] = []
    for index, provider in enumerate(providers):
        where = f"{source}: providers[{index}]"
        if not isinstance(provider, dict):
            raise FleetError(f"{where} must be a mapping")
        name = _field(provider, "name", where)
        url = urlsplit(_field(provider, "base_url", where))
        if not any_host and url.hostname not in LOOPBACK_HOSTS:
            skipped.append((name, f"base_url host {url.hostname!r} is not loopback"))
            continue
        if url.scheme != "http":
            skipped.append((name, f"scheme {url.scheme!r}: the simulator serves plain http only"))
            continue
        health = _field(provider, "health_check_path", where, default="/health")
        if not health.startswith("/"):
            raise FleetError(f"{where}.health_check_path must start with /, got {health!r}")
        try:
            port = url.port or 80
        except ValueError as error:
            raise FleetError(f"{where}.base_url: {error}") from error
        specs.append(
            SimSpec(
                name=name,
                port=port,
                model_ids=_model_ids(provider, where),
                health_check_path=health,
                profile=profile_for(name),
                host=url.hostname if url.hostname in LOOPBACK_HOSTS else "127.0.0.1",
            )
        )
    return Fleet(specs=tuple(specs), skipped=tuple(skipped))


def load_fleet(path: Path, *, any_host: bool = False) -> Fleet:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise FleetError(f"cannot read policy file {path}: {error}") from error
    except yaml.YAMLError as error:
        raise FleetError(f"{path}: invalid YAML: {error}") from error
    return fleet_from_policy(document, source=str(path), any_host=any_host)


def select(fleet: Fleet, only: Collection[str]) -> Fleet:
    """The fleet cut down to the providers named in `only` (all of it when `only` is empty)."""
    if not only:
        return fleet
    known = {spec.name for spec in fleet.specs}
    missing = sorted(set(only) - known)
    if missing:
        raise FleetError(
            f"--only names {missing} not among the simulated providers {sorted(known)}"
        )
    return Fleet(
        specs=tuple(spec for spec in fleet.specs if spec.name in only), skipped=fleet.skipped
    )


def adhoc_spec(argument: str, model_ids: Sequence[str]) -> SimSpec:
    """A generic-profile provider from "NAME=PORT" serving `model_ids`."""
    match = _PROVIDER_ARG.match(argument)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise FleetError(
            f"--provider wants NAME=PORT (name like ^[a-z][a-z0-9_-]*$), got {argument!r}"
        )
    if not model_ids:
        raise FleetError(f"--provider {argument}: give the model ids it serves with --model")
    return SimSpec(
        name=match["name"],
        port=int(match["port"]),
        model_ids=tuple(dict.fromkeys(model_ids)),
        profile=GENERIC_PROFILE,
    )
