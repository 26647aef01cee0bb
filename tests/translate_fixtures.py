"""Test scaffolding for the translator: hand-built configs, and a static Envoy bootstrap made
from translated resources (ADS references replaced by the resources themselves)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import protocol_pb2
from envoy.extensions.filters.http.credential_injector.v3 import credential_injector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.http.injected_credentials.generic.v3 import generic_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as upstream_http_pb2
from ext_proc_fixtures import test_certs
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from control_plane.policy.model import (
    Credential,
    Gpu,
    Model,
    Offering,
    Policy,
    Price,
    Provider,
    RoutingConfig,
    Upstream,
)
from control_plane.translate import EnvoyResources
from control_plane.translate.clusters import HTTP_PROTOCOL_OPTIONS
from control_plane.translate.endpoints import single_endpoint
from control_plane.translate.newer_api import PriorityGroupClusterSpecifier
from gpu_router.bootstrap import edge_secrets

M = TypeVar("M", bound=Message)


def provider(
    name: str,
    base_url: str,
    *,
    credential: Credential | None = None,
    max_concurrency: int = 64,
    health_check_path: str = "/health",
    model_ids: Mapping[str, str] | None = None,
) -> Provider:
    """A provider at `base_url` (its path is the path prefix) offering `model_ids` (public model
    name -> the provider's own id)."""
    url = urlsplit(base_url)
    assert url.hostname is not None, base_url
    port = url.port or (443 if url.scheme == "https" else 80)
    offerings = tuple(
        Offering(
            model=model, provider_model_id=own_id, gpu="H100", price=Price(input=1.0, output=1.0)
        )
        for model, own_id in (model_ids or {}).items()
    )
    return Provider(
        name=name,
        base_url=base_url,
        upstream=Upstream(
            scheme=url.scheme, host=url.hostname, port=port, path_prefix=url.path.rstrip("/")
        ),
        gpus=(Gpu(type="H100", memory_gb=80),),
        offerings=offerings,
        max_concurrency=max_concurrency,
        health_check_path=health_check_path,
        credential=credential,
    )


def routing_config(
    *providers: Provider,
    policies: tuple[Policy, ...] = (Policy(name="default"),),
    models: tuple[Model, ...] = (),
) -> RoutingConfig:
    """`providers` under `policies` (by default one catch-all, "default")."""
    return RoutingConfig(providers=providers, models=models, policies=policies)


def static_bootstrap(
    resources: EnvoyResources, *, admin_port: int, xds_port: int
) -> bootstrap_pb2.Bootstrap:
    """Everything ADS would deliver, inlined: RDS -> route_config, EDS -> load_assignment,
    SDS -> static secrets; plus the bootstrap's own xDS/ALS cluster on `xds_port` and the node's
    certificate for ext_proc (the edge-test one of ext_proc_fixtures.test_certs)."""
    (route_config,) = resources.routes.values()
    bootstrap = bootstrap_pb2.Bootstrap()
    bootstrap.node.id = "translate-test"
    bootstrap.node.cluster = "gpu-router-edge"
    bootstrap.admin.address.socket_address.address = "127.0.0.1"
    bootstrap.admin.address.socket_address.port_value = admin_port
    for listener in resources.listeners.values():
        static = bootstrap.static_resources.listeners.add()
        static.CopyFrom(listener)
        network_filter = static.filter_chains[0].filters[0]
        manager = _unpacked(network_filter.typed_config, hcm_pb2.HttpConnectionManager())
        manager.ClearField("rds")
        manager.route_config.CopyFrom(route_config)
        network_filter.typed_config.Pack(manager)
    for name, cluster in resources.clusters.items():
        static_cluster = bootstrap.static_resources.clusters.add()
        static_cluster.CopyFrom(cluster)
        if cluster.type == cluster_pb2.Cluster.EDS:
            static_cluster.type = cluster_pb2.Cluster.STATIC
            static_cluster.ClearField("eds_cluster_config")
            static_cluster.load_assignment.CopyFrom(resources.endpoints[name])
        _inline_secret_references(static_cluster)
    bootstrap.static_resources.clusters.append(_xds_cluster(xds_port))
    bootstrap.static_resources.secrets.extend(resources.secrets.values())
    for secret in edge_secrets(test_certs()["edge-test"]):  # the node's own, as in production
        json_format.ParseDict(secret, bootstrap.static_resources.secrets.add())
    return bootstrap


def write_bootstrap(bootstrap: bootstrap_pb2.Bootstrap, path: Path) -> Path:
    """As binary protobuf (`path` must end in .pb): JSON would lose the Envoy 1.40 fields the
    stubs lack (see control_plane/translate/newer_api.py)."""
    assert path.suffix == ".pb", path
    path.write_bytes(bootstrap.SerializeToString())
    return path


def _unpacked(packed: any_pb2.Any, message: M) -> M:
    assert packed.Unpack(message), f"expected {message.DESCRIPTOR.full_name}, got {packed.type_url}"
    return message


def _inline_secret_references(cluster: cluster_pb2.Cluster) -> None:
    """SdsSecretConfig with only a name refers to a static secret."""
    if HTTP_PROTOCOL_OPTIONS not in cluster.typed_extension_protocol_options:
        return
    packed_options = cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS]
    options = _unpacked(packed_options, upstream_http_pb2.HttpProtocolOptions())
    for http_filter in options.http_filters:
        if http_filter.name != "envoy.filters.http.credential_injector":
            continue
        injector = _unpacked(http_filter.typed_config, credential_injector_pb2.CredentialInjector())
        generic = _unpacked(injector.credential.typed_config, generic_pb2.Generic())
        generic.credential.ClearField("sds_config")
        injector.credential.typed_config.Pack(generic)
        http_filter.typed_config.Pack(injector)
    packed_options.Pack(options)


def _xds_cluster(port: int) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(
        name="gpu-router.xds",
        type=cluster_pb2.Cluster.STATIC,
        load_assignment=single_endpoint("gpu-router.xds", "127.0.0.1", port),
    )
    options = upstream_http_pb2.HttpProtocolOptions(
        explicit_http_config=upstream_http_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].Pack(options)
    return cluster


def priority_group_specifier(route):
    """The route's priority_group cluster specifier, unpacked."""
    extension = route.route.inline_cluster_specifier_plugin.extension
    assert extension.name == "envoy.router.cluster_specifier_plugin.priority_group"
    specifier = PriorityGroupClusterSpecifier()
    assert extension.typed_config.Unpack(specifier)
    return specifier


def attempt_order(route) -> list[str]:
    """The cluster of attempt 1, 2, ...: one cluster per priority group."""
    order = []
    for group in priority_group_specifier(route).priority_groups:
        (weighted,) = group.clusters
        assert group.name == weighted.cluster_name and weighted.weight.value == 1
        order.append(weighted.cluster_name)
    return order
