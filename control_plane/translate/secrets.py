"""SDS secrets: provider API keys, one generic_secret per credentialed provider; and the
certificate the edge listener serves, when it serves TLS.

The secret carries the full header value (prefix + key): the generic credential's
header_value_prefix field exists in Envoy 1.40 but not in the xds-protos stubs we build with,
and a prefixed secret works on every Envoy that has the credential injector.
"""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from control_plane.edge_certificate import ListenerCertificate
from control_plane.policy.model import RoutingConfig
from control_plane.translate.errors import MissingCredentialError
from control_plane.translate.names import EDGE_LISTENER_SECRET, credential_secret


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


def listener_secret(certificate: ListenerCertificate) -> secret_pb2.Secret:
    """The edge listener's certificate chain and key (Envoy redacts the key in /config_dump)."""
    return secret_pb2.Secret(
        name=EDGE_LISTENER_SECRET,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=certificate.chain),
            private_key=base_pb2.DataSource(inline_bytes=certificate.key),
        ),
    )
