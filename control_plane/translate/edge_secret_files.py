"""Where an edge reads its own certificate and the fleet's CA: static secrets in its bootstrap,
or files it watches (file-based SDS), so that a renewed certificate is used without a restart.

The ext_proc cluster names both secrets (clusters.py `_ext_proc_tls`). Named alone, Envoy looks
them up in the bootstrap's static secrets, which it reads once. A node whose bootstrap declares
a secrets directory (node metadata {"gpu_router": {"secrets_dir": D}}, gpu_router/bootstrap.py)
is served the cluster with each name's SDS file in D instead: Envoy watches that file and the
files it names, and takes a renewed pair from the next connection on. The key still never
leaves the edge's machine: the control plane names a path, the edge reads it."""

from __future__ import annotations

from pathlib import PurePosixPath

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2

from control_plane.translate.names import EDGE_CERTIFICATE_SECRET, FLEET_CA_SECRET

CONNECTION_MAX_AGE_S = 30
"""How long an edge's connection to the control plane or to a replica takes new streams. Envoy
does not close connections when it reloads a certificate, and the control plane and the
replicas refuse every stream a revoked certificate opens (at its next message), so an edge
whose certificate was renewed and the old one then revoked kept failing on the connections it
had made with the old one (measured: its xDS stream lost and about half its requests on the
fallback route for as long as it was watched, 17 s). With a 30 s age it was back 33-51 s after
the revocation (three runs; Envoy's xDS retry backoff adds to the age). envoy/bootstrap.yaml
spells it for the xDS cluster (tests/test_bootstrap.py), and deploy/compose/envoy.yaml as that
does (tests/test_compose.py). The cost: one TLS handshake per Envoy worker and replica every
30 s."""
SDS_FILE_SUFFIX = ".sds.yaml"
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
EDGE_SECRETS = (EDGE_CERTIFICATE_SECRET, FLEET_CA_SECRET)


def sds_file(directory: str, name: str) -> str:
    """The SDS file of secret `name` in a node's secrets directory."""
    return str(PurePosixPath(directory) / f"{name}{SDS_FILE_SUFFIX}")


def sds_secret_config(name: str, directory: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=config_source_pb2.ConfigSource(
        path_config_source=config_source_pb2.PathConfigSource(path=sds_file(directory, name)),
        resource_api_version=config_source_pb2.V3))


def read_from(cluster: cluster_pb2.Cluster, directory: str) -> bool:
    """Point the cluster's edge secrets at the SDS files in `directory`, in place; whether it
    named any."""
    context = tls_pb2.UpstreamTlsContext()
    if not cluster.transport_socket.typed_config.Unpack(context):
        return False
    common = context.common_tls_context
    configs = [*common.tls_certificate_sds_secret_configs,
               common.combined_validation_context.validation_context_sds_secret_config]
    named = [config for config in configs if config.name in EDGE_SECRETS]
    for config in named:
        config.CopyFrom(sds_secret_config(config.name, directory))
    if named:
        cluster.transport_socket.typed_config.Pack(context, deterministic=True)
    return bool(named)
