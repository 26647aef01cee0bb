"""gRPC's mutual-TLS credentials from a process's TlsFiles (gpu_router/pki.py), one way for
every port and client of the fleet: the control plane's gRPC port, ext_proc's, and the clients
of both."""

from __future__ import annotations

import grpc

from gpu_router.pki import TlsFiles


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """This process's certificate, and a client certificate of the CA in `files` required
    before any stream is read."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """This process's certificate, and the CA the server's must chain to."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)
