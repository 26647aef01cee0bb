"""translate(): one consistent, deterministic set of resources."""

from __future__ import annotations

import pytest
from translate_fixtures import provider, routing_config

from control_plane.policy.model import Credential
from control_plane.translate import EdgeSettings, EnvoyResources, MissingCredentialError, translate
from control_plane.translate.newer_api import PriorityGroupClusterSpecifier

CONFIG = routing_config(
    provider("local", "http://127.0.0.1:8101", credential=Credential(env="K")),
    provider(
        "named", "https://api.example.com", credential=Credential(env="K", header="x-api-key")
    ),
    provider("open", "http://localhost:8103"),
)
CREDENTIALS = {"local": "k1", "named": "k2"}


def serialized(resources: EnvoyResources) -> dict[str, dict[str, bytes]]:
    return {
        kind: {
            name: message.SerializeToString(deterministic=True)
            for name, message in getattr(resources, kind).items()
        }
        for kind in ("listeners", "routes", "clusters", "endpoints", "secrets")
    }


def test_resources_are_complete_and_cross_referenced() -> None:
    resources = translate(CONFIG, EdgeSettings(), CREDENTIALS)
    assert list(resources.listeners) == ["gpu-router.edge"]
    assert list(resources.routes) == ["gpu-router.routes"]
    assert list(resources.clusters) == ["local", "named", "open", "gpu-router.ext_proc"]
    assert list(resources.endpoints) == ["local", "open"]
    assert list(resources.secrets) == ["gpu-router.credential.local", "gpu-router.credential.named"]
    for route in resources.routes["gpu-router.routes"].virtual_hosts[0].routes:
        if route.HasField("direct_response"):
            continue
        specifier = PriorityGroupClusterSpecifier()
        assert route.route.inline_cluster_specifier_plugin.extension.typed_config.Unpack(specifier)
        clusters = {c.cluster_name for g in specifier.priority_groups for c in g.clusters}
        assert clusters <= set(resources.clusters) - {"gpu-router.ext_proc"}


def test_same_inputs_give_byte_identical_resources() -> None:
    assert serialized(translate(CONFIG, EdgeSettings(), CREDENTIALS)) == serialized(
        translate(CONFIG, EdgeSettings(), dict(reversed(CREDENTIALS.items())))
    )


def test_a_changed_key_changes_only_the_secrets() -> None:
    before = serialized(translate(CONFIG, EdgeSettings(), CREDENTIALS))
    after = serialized(translate(CONFIG, EdgeSettings(), {**CREDENTIALS, "named": "rotated"}))
    assert [kind for kind in before if before[kind] != after[kind]] == ["secrets"]


def test_resources_are_read_only() -> None:
    resources = translate(CONFIG, EdgeSettings(), CREDENTIALS)
    with pytest.raises(TypeError):
        resources.clusters["extra"] = resources.clusters["local"]  # type: ignore[index]


def test_missing_credential_is_reported() -> None:
    with pytest.raises(MissingCredentialError):
        translate(CONFIG, EdgeSettings(), {"local": "k1"})
