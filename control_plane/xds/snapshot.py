"""Immutable xDS snapshots: per resource type, a content version and the resources by name.

A snapshot is what every stream serves from; it never changes after it is built, so a
stream can hold one while the cache moves on. Versions are content hashes, so publishing
identical resources again is a no-op on the wire.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import any_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from control_plane.xds import type_urls

_NAME_FIELD = {type_urls.ENDPOINT: "cluster_name"}
"""Field holding a resource's own name, where it is not `name`."""


_REFERENCING = frozenset(
    {type_urls.CLUSTER, type_urls.LISTENER, type_urls.ROUTE, type_urls.ENDPOINT, type_urls.SECRET}
)
"""The types check_consistent's references run between."""


class SnapshotInconsistent(ValueError):
    """A snapshot references resources it does not contain (Envoy would wait for them forever)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("inconsistent xDS snapshot: " + "; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True, kw_only=True)
class TypeResources:
    """All resources of one type, with the content hash that is their xDS version."""

    version: str
    resources: Mapping[str, any_pb2.Any]

    @classmethod
    def of(cls, messages: Mapping[str, Message]) -> TypeResources:
        packed = {name: _pack(message) for name, message in messages.items()}
        digest = hashlib.sha256()
        for name in sorted(packed):
            value = packed[name].SerializeToString(deterministic=True)
            digest.update(f"{len(name)}:{name}:{len(value)}:".encode())
            digest.update(value)
        return cls(version=digest.hexdigest()[:16], resources=MappingProxyType(packed))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Resources per type URL. A type absent here was never published (unlike an empty one)."""

    types: Mapping[str, TypeResources] = field(default_factory=lambda: MappingProxyType({}))

    def with_types(self, updates: Mapping[str, Mapping[str, Message]]) -> Snapshot:
        """A new snapshot with the given types replaced wholesale and every other type kept."""
        merged = dict(self.types)
        merged.update(
            {type_url: TypeResources.of(messages) for type_url, messages in updates.items()}
        )
        return Snapshot(MappingProxyType(merged))

    def version(self, type_url: str) -> str:
        """The type's version, "" when it was never published."""
        entry = self.types.get(type_url)
        return entry.version if entry is not None else ""

    def resources(self, type_url: str) -> Mapping[str, any_pb2.Any]:
        entry = self.types.get(type_url)
        return entry.resources if entry is not None else MappingProxyType({})

    def has(self, type_url: str) -> bool:
        return type_url in self.types

    def check_consistent(self, changed: Collection[str] | None = None) -> None:
        """Raise SnapshotInconsistent unless every reference resolves inside this snapshot.

        Checked: each resource's own name equals its key, every EDS cluster's
        ClusterLoadAssignment is present, every route configuration a listener names over
        RDS is present, and every SDS secret a cluster or listener names is present.
        `changed`: the only types that changed since a snapshot that passed (None: all); then
        only their names are checked, and the references only if one of them can hold or name
        one: a health or spend push (every 200 ms) does not unpack every listener and cluster.
        """
        types = self.types if changed is None else [t for t in self.types if t in changed]
        problems = [
            f"{_short(type_url)} keyed {key!r} is named {own!r}"
            for type_url in types
            for key, own in self._own_names(type_url)
            if own != key
        ]
        if changed is not None and not _REFERENCING.intersection(changed):
            if problems:
                raise SnapshotInconsistent(problems)
            return
        endpoints = self.resources(type_urls.ENDPOINT)
        routes = self.resources(type_urls.ROUTE)
        secrets = self.resources(type_urls.SECRET)
        for name, packed in self.resources(type_urls.CLUSTER).items():
            cluster = cluster_pb2.Cluster()
            packed.Unpack(cluster)
            if cluster.type == cluster_pb2.Cluster.EDS:
                wanted = cluster.eds_cluster_config.service_name or cluster.name
                if wanted not in endpoints:
                    problems.append(f"cluster {name!r} needs endpoints {wanted!r}")
        for type_url in (type_urls.CLUSTER, type_urls.LISTENER):
            for name, packed in self.resources(type_url).items():
                for found in _walk(_unpack(packed)):
                    if (
                        isinstance(found, http_connection_manager_pb2.Rds)
                        and found.route_config_name not in routes
                    ):
                        problems.append(
                            f"listener {name!r} needs route configuration "
                            f"{found.route_config_name!r}"
                        )
                    elif (
                        isinstance(found, secret_pb2.SdsSecretConfig)
                        and found.HasField("sds_config")
                        and found.name not in secrets
                    ):
                        problems.append(f"{_short(type_url)} {name!r} needs secret {found.name!r}")
        if problems:
            raise SnapshotInconsistent(problems)

    def _own_names(self, type_url: str) -> Iterator[tuple[str, str]]:
        name_field = _NAME_FIELD.get(type_url, "name")
        for key, packed in self.resources(type_url).items():
            message = _unpack(packed)
            if message is not None and name_field in message.DESCRIPTOR.fields_by_name:
                yield key, getattr(message, name_field)


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


def _pack(message: Message) -> any_pb2.Any:
    if isinstance(message, any_pb2.Any):
        return message
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed


def _unpack(packed: any_pb2.Any) -> Message | None:
    """The message inside an Any, or None when its type is not registered in this process."""
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(packed.TypeName())
    except KeyError:
        return None
    message = message_factory.GetMessageClass(descriptor)()
    packed.Unpack(message)
    return message


def _walk(message: Message | None) -> Iterator[Message]:
    """The message and every message inside it, looking through typed_config Anys."""
    if message is None:
        return
    yield message
    for field_descriptor, value in message.ListFields():
        if field_descriptor.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if field_descriptor.message_type.GetOptions().map_entry:
            value_field = field_descriptor.message_type.fields_by_name["value"]
            children = value.values() if value_field.type == FieldDescriptor.TYPE_MESSAGE else ()
        elif field_descriptor.is_repeated:
            children = value
        else:
            children = (value,)
        for child in children:
            yield from _walk(_unpack(child) if isinstance(child, any_pb2.Any) else child)
