"""SDS secrets for provider keys."""

from __future__ import annotations

import pytest
from translate_fixtures import provider, routing_config

from control_plane.policy.model import Credential
from control_plane.translate.errors import MissingCredentialError
from control_plane.translate.secrets import credential_secrets

CONFIG = routing_config(
    provider("bearer", "http://127.0.0.1:1", credential=Credential(env="A")),
    provider(
        "raw", "http://127.0.0.1:2", credential=Credential(env="B", header="x-api-key", prefix="")
    ),
    provider("open", "http://127.0.0.1:3"),
)


def test_one_generic_secret_per_credentialed_provider_holding_the_header_value() -> None:
    secrets = credential_secrets(CONFIG, {"bearer": "k1", "raw": "k2", "open": "unused"})
    assert list(secrets) == ["gpu-router.credential.bearer", "gpu-router.credential.raw"]
    assert secrets["gpu-router.credential.bearer"].name == "gpu-router.credential.bearer"
    assert (
        secrets["gpu-router.credential.bearer"].generic_secret.secret.inline_string == "Bearer k1"
    )
    assert secrets["gpu-router.credential.raw"].generic_secret.secret.inline_string == "k2"


def test_a_credentialed_provider_without_a_value_is_an_error() -> None:
    with pytest.raises(MissingCredentialError, match="'raw'") as raised:
        credential_secrets(CONFIG, {"bearer": "k1"})
    assert raised.value.provider == "raw"
