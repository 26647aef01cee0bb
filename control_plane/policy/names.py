"""The models section, and the names (models, aliases, providers, policies) later sections
resolve against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from control_plane.policy.checker import MISSING, Checker
from control_plane.policy.issues import KeyPath
from control_plane.policy.model import Model


@dataclass(slots=True, kw_only=True)
class Names:
    """What later sections resolve names against, filled while earlier ones are read.

    A name is recorded even when the rest of its entry is invalid, so one bad field
    does not cascade into "unknown model" issues elsewhere.
    """

    canonical: dict[str, str]
    """Model name or alias -> canonical model name."""
    first_seen: dict[str, KeyPath]
    """Model name or alias -> where it was declared (names and aliases share one space)."""
    models: dict[str, KeyPath]
    """Canonical model name -> its `name` key path."""
    providers: dict[str, KeyPath]
    policies: dict[str, KeyPath]
    served: set[str]
    """Canonical names of models that some provider offers."""


def read_model(check: Checker, raw: Any, path: KeyPath, names: Names) -> Model | None:
    fields = check.mapping(raw, path, required=("name",),
                           optional=("aliases", "min_gpu_memory_gb", "gpu_types"))
    if fields is None:
        return None
    name = check.string(fields.get("name", MISSING), (*path, "name"))
    aliases = check.items(fields.get("aliases", []), (*path, "aliases"), check.string)
    if name is not None:
        check.unique(names.first_seen, name, (*path, "name"), "model name or alias")
        names.canonical.setdefault(name, name)
        names.models.setdefault(name, (*path, "name"))
    for index, alias in enumerate(aliases or ()):
        check.unique(names.first_seen, alias, (*path, "aliases", index), "model name or alias")
        if name is not None:
            names.canonical.setdefault(alias, name)
    min_memory = check.number(fields.get("min_gpu_memory_gb", 0), (*path, "min_gpu_memory_gb"))
    gpu_types = check.items(fields.get("gpu_types", []), (*path, "gpu_types"), check.string)
    if gpu_types is not None:
        seen: dict[str, KeyPath] = {}
        for index, gpu_type in enumerate(gpu_types):
            check.unique(seen, gpu_type, (*path, "gpu_types", index), "gpu type")
    if name is None or aliases is None or min_memory is None or gpu_types is None:
        return None
    return Model(name=name, aliases=tuple(aliases), min_gpu_memory_gb=min_memory,
                 gpu_types=tuple(gpu_types))


def known_model(check: Checker, name: str | None, path: KeyPath,
                 names: Names) -> str | None:
    """The canonical name for a model name or alias; an issue when nobody declared it."""
    if name is None:
        return None
    canonical = names.canonical.get(name)
    if canonical is None:
        check.fail(path, f"unknown model '{name}'; known models: {', '.join(names.models)}")
    return canonical
