"""Requests in progress per provider, as each edge's load reports say (load_reports.py).

The fleet's sum per provider goes into every health entry; per edge, the providers whose
requests in progress reached their max_concurrency go into the snapshot's `at_cap`: that edge
queues requests to them (the cap waits rather than refuses: provider_cap.py), which no latency
shows, so ext_proc tries them last for that edge's requests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping


class InFlight:
    """Each report stream's last counts (per provider), and which edge sent them."""

    def __init__(self) -> None:
        self._by_source: dict[str, dict[str, int]] = {}
        self._edge_of: dict[str, str] = {}
        self._latest: dict[str, str] = {}
        """Edge -> its stream that reported last: an edge that reconnected reports on the new
        one, while the old one's counts linger until that stream is seen to end."""
        self.totals: dict[str, int] = {}
        """Provider -> requests in progress over every edge."""

    def record(self, source: str, edge: str, counts: Mapping[str, int]) -> bool:
        """Replace what `source` (one report stream of the node `edge`) has in progress;
        whether anything changed."""
        previous = self._by_source.get(source, {})
        self._by_source[source] = dict(counts)
        self._edge_of[source] = edge
        latest = self._latest.get(edge)
        self._latest[edge] = source
        if counts == previous and latest == source:
            return False
        self._sum()
        return True

    def forget(self, source: str) -> bool:
        """A stream that ended: nothing it reported is in progress any more. Whether that
        changed anything."""
        edge = self._edge_of.pop(source, None)
        if edge is not None and self._latest.get(edge) == source:
            del self._latest[edge]
        if not self._by_source.pop(source, None):
            return False
        self._sum()
        return True

    def keep(self, known: Callable[[str], bool]) -> None:
        """Forget the providers `known` says no."""
        for source, counts in self._by_source.items():
            self._by_source[source] = {p: n for p, n in counts.items() if known(p)}
        self._sum()

    def at_cap(self, caps: Mapping[str, int]) -> dict[str, list[str]]:
        """Edge -> the providers (sorted) it has as many requests in progress to as their cap
        in `caps`, by its latest report; edges with none are left out."""
        full = {edge: sorted(p for p, n in self._by_source[source].items()
                             if 0 < caps.get(p, 0) <= n)
                for edge, source in self._latest.items()}
        return {edge: providers for edge, providers in full.items() if providers}

    def _sum(self) -> None:
        totals: dict[str, int] = {}
        for counts in self._by_source.values():
            for provider, count in counts.items():
                totals[provider] = totals.get(provider, 0) + count
        self.totals = totals
