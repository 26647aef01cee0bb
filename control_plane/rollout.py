"""Make-before-break rollout of a policy to Envoy nodes and ext_proc replicas.

ext_proc must never name a cluster Envoy has not accepted (a cluster_header naming an
unknown cluster is a 404), and a removed provider must leave ext_proc's view before its
cluster leaves Envoy. So a new policy goes out in four steps:

  a. Envoy gets the new listener, routes and the union of old and new clusters (with their
     endpoints and secrets);
  b. wait until every connected Envoy node ACKed that CDS and LDS, and EDS carrying every
     new cluster's endpoints (an ACKed cluster still warms until its endpoints arrive, and
     a warming cluster is as unknown to cluster_header as a missing one);
  c. ext_proc replicas get the new RoutingPolicy; wait for their ACKs;
  d. Envoy gets the final clusters, without the removed ones.

A step whose ACKs do not arrive in time is logged and the rollout goes on: a node that
is down or rejecting must not freeze the whole fleet on the old policy.

Fleet health shapes two of the resources: its weights order the fallback route and pick
the watched providers, whose clusters get watchful outlier detection. Weights that arrive
during a rollout are applied by its last step, so a health push never publishes the old
policy's routes or clusters over a rollout half done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from google.protobuf.message import Message

from control_plane.edge_certificate import EdgeCertificateError, read_listener_certificate
from control_plane.policy.credentials import CredentialError, resolve_credentials
from control_plane.policy.load import PolicyError, load_policy_file
from control_plane.policy.model import RoutingConfig
from control_plane.policy.wire import to_routing_policy
from control_plane.telemetry.weights import fitted, watched
from control_plane.translate import EdgeSettings, EnvoyResources, TranslationError, translate
from control_plane.translate.clusters import all_clusters, ext_proc_cluster
from control_plane.translate.names import EXT_PROC_CLUSTER
from control_plane.translate.routes import route_configuration
from control_plane.xds import type_urls
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.snapshot import Snapshot, SnapshotInconsistent
from gpu_router.api.v1 import routing_pb2

log = logging.getLogger(__name__)

EDGE_NODES = "gpu-router-edge"
EXT_PROC_NODES = "gpu-router-ext-proc"
ROUTING_POLICY_NAME = "default"

REJECTIONS: tuple[type[Exception], ...] = (
    PolicyError,
    CredentialError,
    EdgeCertificateError,
    TranslationError,
    SnapshotInconsistent,
)
"""What makes a policy file unusable; everything else is a bug."""

_MERGED_TYPES = (type_urls.CLUSTER, type_urls.ENDPOINT, type_urls.SECRET)
"""Types whose old entries stay published until ext_proc has the new policy."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    """A policy ready to roll out: validated, credentials resolved, translated and checked."""

    config: RoutingConfig
    settings: EdgeSettings
    edge: Mapping[str, Mapping[str, Message]]
    """Envoy resources by type URL, then by name, before fleet health shapes them."""
    routing_policy: routing_pb2.RoutingPolicy


def prepare_release(
    path: Path, settings: EdgeSettings, edge_tls_files: tuple[Path, Path] | None = None
) -> Release:
    """Everything that can fail about a policy file, before anything is published; with
    `edge_tls_files` (certificate, key), the certificate the edge listener serves, re-read.

    Raises one of REJECTIONS, whose str is the readable reason.
    """
    config = load_policy_file(path)
    certificate = None if edge_tls_files is None else read_listener_certificate(*edge_tls_files)
    resources = translate(config, settings, resolve_credentials(config), certificate)
    edge = _by_type(resources)
    Snapshot().with_types(edge).check_consistent()
    return Release(
        config=config, settings=settings, edge=edge, routing_policy=to_routing_policy(config)
    )


def with_ext_proc_crl(release: Release, crl: bytes) -> Release:
    """`release` with the fleet's CRL `crl` (PEM) in its ext_proc cluster: a revocation reaches
    the edges without a reload of the policy file, which may be mid-edit and rejected. The same
    release when it has that CRL already."""
    if crl == release.settings.ext_proc_crl:
        return release
    settings = replace(release.settings, ext_proc_crl=crl)
    clusters = {**release.edge[type_urls.CLUSTER], EXT_PROC_CLUSTER: ext_proc_cluster(settings)}
    return replace(release, settings=settings, edge={**release.edge, type_urls.CLUSTER: clusters})


def _by_type(resources: EnvoyResources) -> dict[str, Mapping[str, Message]]:
    return {
        type_urls.CLUSTER: resources.clusters,
        type_urls.ENDPOINT: resources.endpoints,
        type_urls.SECRET: resources.secrets,
        type_urls.LISTENER: resources.listeners,
        type_urls.ROUTE: resources.routes,
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class AckTimeouts:
    edge_s: float = 10.0
    ext_proc_s: float = 5.0


class Rollout:
    """Applies releases to the cache one at a time, in make-before-break order."""

    def __init__(self, cache: SnapshotCache, timeouts: AckTimeouts = AckTimeouts()) -> None:
        self._cache = cache
        self._timeouts = timeouts
        self._lock = asyncio.Lock()
        self._weights: Mapping[str, int] | None = None
        self.current: Release | None = None

    def apply_weights(self, weights: Mapping[str, int]) -> None:
        """Publish fleet-health weights at once, or leave them to the rollout in progress."""
        self._weights = dict(weights)
        if self.current is not None and not self._lock.locked():
            self._cache.set_types(self._health_shaped(self.current))

    def _health_shaped(self, release: Release) -> dict[str, Mapping[str, Message]]:
        """The release's routes and clusters as the latest fleet weights shape them."""
        if self._weights is None:
            return {t: release.edge[t] for t in (type_urls.ROUTE, type_urls.CLUSTER)}
        config, settings = release.config, release.settings
        weights = fitted(self._weights, [p.name for p in config.providers])
        routes = route_configuration(config, settings, weights)
        return {
            type_urls.ROUTE: {routes.name: routes},
            type_urls.CLUSTER: all_clusters(config, settings, watched(weights)),
        }

    async def apply(self, release: Release) -> None:
        async with self._lock:
            await self._apply(release)

    async def reapply(self, change: Callable[[Release], Release]) -> bool:
        """Apply `change` of the release served once the rollouts before it are done (so it
        never brings back a policy a newer rollout replaced); nothing before the first, nor
        when `change` returns the release as it is (a rollout meanwhile may have made it so).
        Whether it applied one."""
        async with self._lock:
            if self.current is None:
                return False
            changed = change(self.current)
            if changed is self.current:
                return False
            await self._apply(changed)
            return True

    async def _apply(self, release: Release) -> None:
        started = time.monotonic()
        old = self._cache.snapshot
        edge = {**release.edge, **self._health_shaped(release)}
        merged = {t: {**old.resources(t), **edge[t]} for t in _MERGED_TYPES}
        staged = self._cache.set_types({**edge, **merged})
        edge_acked = await self._wait(
            staged,
            {
                type_urls.CLUSTER: frozenset(),
                type_urls.ENDPOINT: frozenset(release.edge[type_urls.ENDPOINT]),
                type_urls.LISTENER: frozenset(),
            },
            EDGE_NODES,
            self._timeouts.edge_s,
        )
        policy = self._cache.set_types(
            {type_urls.ROUTING_POLICY: {ROUTING_POLICY_NAME: release.routing_policy}}
        )
        ext_proc_acked = await self._wait(
            policy,
            {type_urls.ROUTING_POLICY: frozenset()},
            EXT_PROC_NODES,
            self._timeouts.ext_proc_s,
        )
        # Weights that arrived meanwhile are applied here.
        edge = {**release.edge, **self._health_shaped(release)}
        final = self._cache.set_types({t: edge[t] for t in (*_MERGED_TYPES, type_urls.ROUTE)})
        self.current = release
        log.info(
            "policy_applied",
            extra={
                "file": release.config.source,
                "policy_version": release.config.version,
                "providers": [p.name for p in release.config.providers],
                "removed_clusters": sorted(
                    set(old.resources(type_urls.CLUSTER)) - set(release.edge[type_urls.CLUSTER])
                ),
                "cds_version": final.version(type_urls.CLUSTER),
                "lds_version": final.version(type_urls.LISTENER),
                "edge_acked": edge_acked,
                "ext_proc_acked": ext_proc_acked,
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
            },
        )

    async def _wait(
        self,
        snapshot: Snapshot,
        types: Mapping[str, frozenset[str]],
        node_cluster: str,
        timeout: float,
    ) -> bool:
        """Wait for `node_cluster` nodes to ACK each type's version in `snapshot`, covering the
        given names (one shared deadline); log what is missing."""
        deadline = time.monotonic() + timeout
        acked = True
        for type_url, names in types.items():
            version = snapshot.version(type_url)
            remaining = max(0.0, deadline - time.monotonic())
            if not await self._cache.wait_acked(type_url, version, node_cluster, remaining, names):
                acked = False
                log.warning(
                    "rollout_not_acked",
                    extra={
                        "type_url": type_url,
                        "version": version,
                        "node_cluster": node_cluster,
                        "timeout_s": timeout,
                        "nodes": [
                            {"id": n["id"], "types": n["types"].get(type_url)}
                            for n in self._cache.nodes()
                            if n["cluster"] == node_cluster
                        ],
                    },
                )
        return acked
