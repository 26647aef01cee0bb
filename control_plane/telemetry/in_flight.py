"""Requests in progress per provider, as each edge's load reports say (load_reports.py).

The fleet's sum per provider goes into every provider-wide health entry; per edge, the providers
whose requests in progress reached their max_concurrency go into the snapshot's `at_cap`: that
edge queues requests to them (the cap waits rather than refuses: provider_cap.py), which no
latency shows, so ext_proc puts others before them for that edge's requests.

An edge has one report stream at a time; one that reconnects reports on the new stream while the
old one may not yet be seen to end, so each edge counts by the stream that reported last.
That assumes one Envoy per certificate name, as the stack runs them (no hot restart): two live
Envoys sharing a name would replace each other's counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping


class InFlight:
    """Each edge's last report (its stream, and its counts per provider)."""

    def __init__(self) -> None:
        self._by_edge: dict[str, tuple[str, dict[str, int]]] = {}
        self.totals: dict[str, int] = {}
        """Provider -> requests in progress over every edge."""

    def record(self, source: str, edge: str, counts: Mapping[str, int]) -> bool:
        """What `edge` has in progress, as its stream `source` reports; whether the counts
        changed."""
        previous = self._by_edge.get(edge)
        self._by_edge[edge] = (source, dict(counts))
        if previous is not None and previous[1] == counts:
            return False
        self._sum()
        return True

    def forget(self, source: str) -> bool:
        """A stream that ended: what it reported last is no longer in progress (unless its edge
        reports on a newer stream). Whether that changed anything."""
        edge = next((e for e, (s, _) in self._by_edge.items() if s == source), None)
        if edge is None:
            return False
        _, counts = self._by_edge.pop(edge)
        if not counts:
            return False
        self._sum()
        return True

    def keep(self, known: Callable[[str], bool]) -> None:
        """Forget the providers `known` says no."""
        self._by_edge = {edge: (source, {p: n for p, n in counts.items() if known(p)})
                         for edge, (source, counts) in self._by_edge.items()}
        self._sum()

    def at_cap(self, caps: Mapping[str, int]) -> dict[str, list[str]]:
        """Edge -> the providers (sorted) it has as many requests in progress to as their cap
        in `caps`; edges with none are left out."""
        full = {edge: sorted(p for p, n in counts.items() if 0 < caps.get(p, 0) <= n)
                for edge, (_, counts) in self._by_edge.items()}
        return {edge: providers for edge, providers in full.items() if providers}

    def _sum(self) -> None:
        totals: dict[str, int] = {}
        for _, counts in self._by_edge.values():
            for provider, count in counts.items():
                totals[provider] = totals.get(provider, 0) + count
        self.totals = totals
