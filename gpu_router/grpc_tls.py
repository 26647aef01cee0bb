"""gRPC's mutual-TLS credentials from a process's TlsFiles (gpu_router/pki.py), one way for
every port and client of the fleet: the control plane's gRPC port, ext_proc's, and the clients
of both.

A renewed pair is taken without a restart (tls_renewal.py): a port hands each new connection
the pair its files hold then, and a client reads its files each time it opens a channel
(ext_proc's xDS client opens one per connection to the control plane)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from gpu_router.pki import TlsFiles
from gpu_router.tls_renewal import Renewing

_log = logging.getLogger(__name__)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """This process's certificate, and a client certificate of the CA in `files` required
    before any stream is read; renewed files are served from the next connection on."""
    pair = Renewing(files, _configuration)
    return grpc.dynamic_ssl_server_credentials(pair.current, _fetcher(pair),
                                               require_client_authentication=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """This process's certificate, and the CA the server's must chain to, as the files hold
    them now."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


def _fetcher(pair: Renewing[grpc.ServerCertificateConfiguration]
             ) -> Callable[[], grpc.ServerCertificateConfiguration | None]:
    """What gRPC calls before every new connection's handshake: the renewed pair, or None to
    keep the one served."""

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            return pair.current if pair.refresh() else None
        except Exception:  # noqa: BLE001 - raised into gRPC's handshake, it would be lost
            _log.exception("tls_renewal_failed", extra={"file": str(pair.files.cert)})
            return None

    return fetch


def _configuration(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    ca, cert, key = files.read()
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
