"""docker-compose.yml read as the Compose tests read it: its services, what each runs with which
flags, and where a path a service sees lies on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"


def compose_services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def of_kind(services: dict[str, dict[str, Any]], module: str) -> dict[str, dict[str, Any]]:
    """Services whose command runs `python -m module` (or `envoy` for module "envoy")."""
    return {name: s for name, s in services.items() if program(s["command"]) == module}


def program(command: list[str]) -> str:
    return command[2] if command[:2] == ["python", "-m"] else command[0]


def flags(command: list[str]) -> dict[str, list[str]]:
    """-flag value pairs of an argv, values of repeated flags in order (switches map to [])."""
    out: dict[str, list[str]] = {}
    for index, word in enumerate(command):
        if word.startswith("-"):
            value = command[index + 1 : index + 2]
            out.setdefault(word, []).extend(v for v in value if not v.startswith("-"))
    return out


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """The repository file a service sees at `container_path` through its bind mounts."""
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return (ROOT / source / container_path[len(target) :].lstrip("/")).resolve()
    raise AssertionError(f"{container_path} is not mounted into the service")


def in_volume(service: dict[str, Any], container_path: str, volumes: dict[str, Path]) -> Path:
    """Where `container_path` of a service lies, given each named volume's directory here."""
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        inside = container_path == target or container_path.startswith(target.rstrip("/") + "/")
        if source in volumes and inside:
            return volumes[source] / container_path[len(target) :].lstrip("/")
    raise AssertionError(f"{container_path} is in no named volume of the service")
