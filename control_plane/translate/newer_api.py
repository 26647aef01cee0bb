"""The Envoy 1.40 API this edge uses that the xds-protos 1.85 stubs do not have yet.

Two pieces: the priority_group cluster specifier (extensions/router/cluster_specifiers/
priority_group/v3/priority_group.proto), with its per-request override read from dynamic metadata
(override_metadata_namespace, field 2: found in the 1.40 binary's own descriptors, not yet in the
published docs), and RetryPolicy.refresh_cluster_on_retry (field 14 of
config/route/v3/route_components.proto). The specifier's messages are declared here from that
proto's field numbers, in a private descriptor pool so a later xds-protos that ships them cannot
clash; the retry field is carried as an unknown field, which protobuf keeps and serializes as is.
Both are checked against the real Envoy by tests/test_translate_envoy.py. Drop this module once
xds-protos has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envoy.config.route.v3 import route_components_pb2 as rc_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

PRIORITY_GROUP_PLUGIN = "envoy.router.cluster_specifier_plugin.priority_group"
_PACKAGE = "envoy.extensions.router.cluster_specifiers.priority_group.v3"
_REFRESH_CLUSTER_ON_RETRY = bytes([14 << 3 | 0, 1])
"""RetryPolicy field 14 (bool, varint wire type) = true, encoded."""


def _priority_group_pool() -> descriptor_pool.DescriptorPool:
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    repeated = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    string = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    message = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE

    def field(
        name: str, number: int, kind: int, label: int = optional, type_name: str = ""
    ) -> descriptor_pb2.FieldDescriptorProto:
        described = descriptor_pb2.FieldDescriptorProto(
            name=name, number=number, type=kind, label=label
        )
        if type_name:
            described.type_name = type_name
        return described

    source = descriptor_pb2.FileDescriptorProto(
        name=f"{_PACKAGE.replace('.', '/')}/priority_group.proto",
        package=_PACKAGE,
        syntax="proto3",
        dependency=[wrappers_pb2.DESCRIPTOR.name],
        message_type=[
            descriptor_pb2.DescriptorProto(
                name="ClusterWeight",
                field=[
                    field("cluster_name", 1, string),
                    field("weight", 2, message, type_name=".google.protobuf.UInt32Value"),
                ],
            ),
            descriptor_pb2.DescriptorProto(
                name="PriorityGroup",
                field=[
                    field("name", 1, string),
                    field("clusters", 2, message, repeated, f".{_PACKAGE}.ClusterWeight"),
                ],
            ),
            descriptor_pb2.DescriptorProto(
                name="PriorityGroupClusterSpecifier",
                field=[
                    field("priority_groups", 1, message, repeated, f".{_PACKAGE}.PriorityGroup"),
                    field("override_metadata_namespace", 2, string),
                ],
            ),
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    pool.Add(source)
    return pool


_POOL = _priority_group_pool()
PriorityGroupClusterSpecifier: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName(f"{_PACKAGE}.PriorityGroupClusterSpecifier")
)
"""Envoy's PriorityGroupClusterSpecifier: attempt n goes to priority_groups[n] (the last one once
they run out). With override_metadata_namespace set, a request whose dynamic metadata holds
{"priority_groups": [{"name": g1}, {"name": g2}, ...]} in that namespace walks those groups
instead, skipping names that are not configured groups; without it, or with no configured name
left, the configured order (tests/test_translate_envoy.py shows both on the real Envoy)."""


def priority_groups(clusters: Sequence[str], override_namespace: str = "") -> Any:
    """A PriorityGroupClusterSpecifier with one group per cluster, named after it, in order:
    attempt n of a request goes to clusters[n], unless `override_namespace` is given and the
    request's metadata there orders the groups itself."""
    specifier = PriorityGroupClusterSpecifier(override_metadata_namespace=override_namespace)
    for cluster in clusters:
        group = specifier.priority_groups.add(name=cluster)
        group.clusters.add(cluster_name=cluster, weight={"value": 1})
    return specifier


def refresh_cluster_on_retry(policy: rc_pb2.RetryPolicy) -> rc_pb2.RetryPolicy:
    """`policy` with refresh_cluster_on_retry true: each retry asks the route's cluster specifier
    for its cluster again (the priority_group specifier then moves to the next group)."""
    policy.MergeFromString(_REFRESH_CLUSTER_ON_RETRY)
    return policy
