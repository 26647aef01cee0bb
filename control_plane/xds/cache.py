"""The snapshot cache: what is being served now, who is connected, and what they ACKed.

The seam between data and protocol (go-control-plane's SnapshotCache): publishers replace
whole resource types with `set_types`; streams register here, are told when the snapshot
changes, and report ACKs so that a rollout can wait until a group of nodes runs a version.
One snapshot serves every node: Envoy nodes subscribe to Envoy's types and ext_proc
replicas to ours, over the same server.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from control_plane.xds.node import snapshot_version
from control_plane.xds.snapshot import Snapshot, TypeResources
from control_plane.xds.stream import XdsStream


@dataclass(frozen=True, slots=True, kw_only=True)
class _Connection:
    stream: XdsStream
    peer: str
    connected_at_unix_ms: int
    on_change: Callable[[], None]


class SnapshotCache:
    """The current Snapshot plus the registry of open streams."""

    def __init__(self) -> None:
        self._snapshot = Snapshot()
        self._connections: dict[int, _Connection] = {}
        self._published: dict[str, dict[str, int]] = {}
        """type URL -> version -> publication sequence, so ACKs compare as "at least"."""
        self._sequence = itertools.count()
        self._acks_changed = asyncio.Event()

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def set_types(self, updates: Mapping[str, Mapping[str, Message]]) -> Snapshot:
        """Replace the given types wholesale (others kept) and tell every stream.

        Raises SnapshotInconsistent, leaving the served snapshot unchanged, when the result
        references resources it does not contain.
        """
        candidate = self._snapshot.with_types(updates)
        candidate.check_consistent(changed=updates.keys())
        changed = [t for t in updates if candidate.version(t) != self._snapshot.version(t)]
        self._snapshot = candidate
        for type_url in changed:
            self._published.setdefault(type_url, {})[candidate.version(type_url)] = next(
                self._sequence
            )
        if changed:
            for connection in list(self._connections.values()):
                connection.on_change()
        return candidate

    def open_stream(self, stream: XdsStream, peer: str, on_change: Callable[[], None]) -> None:
        """Register a stream; `on_change` is called (synchronously) after every snapshot change."""
        self._connections[id(stream)] = _Connection(
            stream=stream,
            peer=peer,
            connected_at_unix_ms=int(time.time() * 1000),
            on_change=on_change,
        )

    def close_stream(self, stream: XdsStream) -> None:
        self._connections.pop(id(stream), None)
        self.note_acks()

    def note_acks(self) -> None:
        """A stream's ACK state changed: wake `wait_acked` callers to re-check."""
        self._acks_changed.set()
        self._acks_changed = asyncio.Event()

    async def wait_acked(
        self,
        type_url: str,
        version: str,
        node_cluster: str,
        timeout: float,
        names: frozenset[str] = frozenset(),
    ) -> bool:
        """Whether every connected `node_cluster` node ACKed `version` of `type_url` or a later one.

        For a named type, `names` must all be in the ACKed response: an Envoy ACKs the EDS
        version it had before subscribing to a new cluster's endpoints. True at once when
        no such node is connected. False when one NACKs that version or a later one, or
        when `timeout` seconds pass first.
        """
        target = self._published.get(type_url, {}).get(version)
        if target is None:
            raise KeyError(f"version {version!r} of {type_url} was never published")
        try:
            async with asyncio.timeout(timeout):
                while True:
                    woken = self._acks_changed
                    verdict = self._ack_verdict(type_url, target, node_cluster, names)
                    if verdict is not None:
                        return verdict
                    await woken.wait()
        except TimeoutError:
            return False

    def _ack_verdict(
        self, type_url: str, target: int, node_cluster: str, names: frozenset[str]
    ) -> bool | None:
        """True: all ACKed; False: one rejected; None: still waiting."""
        published = self._published.get(type_url, {})
        waiting = False
        for stream in self._streams(node_cluster):
            state = stream.types.get(type_url)
            if state is None:
                waiting = True
                continue
            if published.get(snapshot_version(state.nacked_version), -1) >= target:
                return False
            acked = published.get(snapshot_version(state.acked_version), -1)
            waiting = waiting or acked < target or not stream.acked_covers(type_url, names)
        return None if waiting else True

    def _streams(self, node_cluster: str) -> Iterator[XdsStream]:
        for connection in self._connections.values():
            node = connection.stream.node
            if node is not None and node.cluster == node_cluster:
                yield connection.stream

    def nodes(self) -> list[dict[str, Any]]:
        """Every open stream for the admin page: node, peer, per type what was sent/ACKed/NACKed."""
        out: list[dict[str, Any]] = []
        for connection in self._connections.values():
            node = connection.stream.node
            out.append(
                {
                    "id": node.id if node else "",
                    "cluster": node.cluster if node else "",
                    "edge_port": node.edge_port if node else None,
                    "peer": connection.peer,
                    "connected_at_unix_ms": connection.connected_at_unix_ms,
                    "types": {
                        type_url: {
                            "subscribed": "*" if state.wildcard else sorted(state.names),
                            "sent_version": state.sent_version,
                            "acked_version": state.acked_version,
                            "current_version": _version(
                                connection.stream.view(type_url, self._snapshot)
                            ),
                            "responses_sent": state.responses_sent,
                            "nacked_version": state.nacked_version,
                            "last_nack_error": state.last_error,
                            "parked": state.parked_on is not None,
                        }
                        for type_url, state in connection.stream.types.items()
                    },
                }
            )
        return sorted(out, key=lambda entry: (entry["cluster"], entry["id"]))


def _version(entry: TypeResources | None) -> str:
    return entry.version if entry is not None else ""
