"""Which providers a policy file or command line asks to simulate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from simulator.fleet import (
    FleetError,
    adhoc_spec,
    default_policy_path,
    fleet_from_policy,
    load_fleet,
    select,
)
from simulator.profiles import BUILTIN_PROFILES, GENERIC_PROFILE


def provider(name: str, base_url: str, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "base_url": base_url,
        "models": [{"name": "m", "id": f"{name}/m"}],
        **extra,
    }


def test_default_policy_simulates_its_four_loopback_providers() -> None:
    fleet = load_fleet(default_policy_path())
    document = yaml.safe_load(default_policy_path().read_text())
    assert [spec.name for spec in fleet.specs] == [p["name"] for p in document["providers"]]
    for spec, raw in zip(fleet.specs, document["providers"], strict=True):
        assert f"http://127.0.0.1:{spec.port}" == raw["base_url"]
        assert spec.model_ids == tuple(dict.fromkeys(m.get("id", m["name"]) for m in raw["models"]))
        assert spec.health_check_path == raw.get("health_check_path", "/health")
        assert spec.profile is BUILTIN_PROFILES[spec.name]
    assert fleet.skipped == ()


def test_remote_and_https_providers_are_skipped_with_a_reason() -> None:
    fleet = fleet_from_policy(
        {
            "providers": [
                provider("local", "http://localhost:9001/v1", health_check_path="/healthz"),
                provider("remote", "https://api.example.com"),
                provider("tls", "https://127.0.0.1:9443"),
                {"name": "bare", "base_url": "http://127.0.0.1", "models": [{"name": "x"}]},
            ]
        },
        source="p.yaml",
    )
    assert [(s.name, s.port, s.host, s.health_check_path, s.model_ids) for s in fleet.specs] == [
        ("local", 9001, "localhost", "/healthz", ("local/m",)),
        ("bare", 80, "127.0.0.1", "/health", ("x",)),
    ]
    assert [name for name, _ in fleet.skipped] == ["remote", "tls"]
    assert "not loopback" in fleet.skipped[0][1]
    assert fleet.specs[0].profile is GENERIC_PROFILE


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "providers must be a list"),
        ({"providers": ["x"]}, "providers[0] must be a mapping"),
        ({"providers": [{"base_url": "http://127.0.0.1:1"}]}, "providers[0].name"),
        ({"providers": [{"name": "a", "base_url": "http://127.0.0.1:1"}]}, "providers[0].models"),
        (
            {"providers": [{"name": "a", "base_url": "http://127.0.0.1:1", "models": [{}]}]},
            "providers[0].models[0].id",
        ),
        (
            {"providers": [provider("a", "http://127.0.0.1:1", health_check_path="health")]},
            "must start with /",
        ),
        ({"providers": [provider("a", "http://127.0.0.1:99999")]}, "base_url"),
    ],
)
def test_bad_policy_documents(document: object, message: str) -> None:
    with pytest.raises(FleetError) as error:
        fleet_from_policy(document, source="p.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("p.yaml: ")


def test_load_fleet_reports_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match="cannot read policy file"):
        load_fleet(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("providers: [\n")
    with pytest.raises(FleetError, match="invalid YAML"):
        load_fleet(broken)


def test_select_only() -> None:
    fleet = load_fleet(default_policy_path())
    assert [spec.name for spec in select(fleet, ["vast", "lambda"]).specs] == ["lambda", "vast"]
    assert select(fleet, []) == fleet
    with pytest.raises(FleetError, match=r"\['nope'\]"):
        select(fleet, ["nope"])


def test_adhoc_spec() -> None:
    spec = adhoc_spec("mine=9100", ["a", "b", "a"])
    assert (spec.name, spec.port, spec.model_ids, spec.profile) == (
        "mine",
        9100,
        ("a", "b"),
        GENERIC_PROFILE,
    )
    for bad in ("mine", "Mine=1", "mine=0", "mine=70000"):
        with pytest.raises(FleetError, match="NAME=PORT"):
            adhoc_spec(bad, ["a"])
    with pytest.raises(FleetError, match="--model"):
        adhoc_spec("mine=9100", [])
