"""SDS secrets holding provider API keys, one generic_secret per credentialed provider.

The secret carries the full header value (prefix + key): the generic credential's
header_value_prefix field exists in Envoy 1.40 but not in the xds-protos stubs we build with,
and a prefixed secret works on every Envoy that has the credential injector.
"""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from control_plane.policy.model import RoutingConfig
from control_plane.translate.errors import MissingCredentialError
from control_plane.translate.names import credential_secret


def credential_secrets(
    config: RoutingConfig, credentials: Mapping[str, str]
) -> dict[str, secret_pb2.Secret]:
    """Secrets by name for every provider whose policy has a credential; `credentials` maps
    provider name -> resolved key (entries for other providers are not used)."""
    secrets: dict[str, secret_pb2.Secret] = {}
    for provider in config.providers:
        if provider.credential is None:
            continue
        if provider.name not in credentials:
            raise MissingCredentialError(provider.name)
        name = credential_secret(provider.name)
        value = provider.credential.prefix + credentials[provider.name]
        secrets[name] = secret_pb2.Secret(
            name=name,
            generic_secret=secret_pb2.GenericSecret(
                secret=base_pb2.DataSource(inline_string=value)
            ),
        )
    return secrets
