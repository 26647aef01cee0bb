"""The counter and histogram families behind control_plane/metrics.py: each its own
prometheus_client collector over plain Python values (_Family says why).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

Labels = tuple[str, ...]


class _Family:
    """One metric's values by label values, kept in plain Python objects and rendered by
    prometheus_client only when scraped (this is its collector). prometheus_client's own
    children take a lock per increment and walk the buckets per observation: ~12 of them per
    request were a fifth of booking's time. Metrics' lock guards both updates and scrapes."""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._children: dict[Labels, Any] = {}
        if not self.labelnames:
            self.child(())  # exposed at 0 from the start, as prometheus_client does

    def child(self, labels: Labels) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._new_child()
        return child

    def _new_child(self) -> Any:
        raise NotImplementedError


class _CounterValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Raises ValueError for a negative amount: a counter only goes up."""
        if amount < 0:
            raise ValueError(f"a counter only goes up: cannot add {amount}")
        self.value += amount


class Counter(_Family):
    def _new_child(self) -> _CounterValue:
        return _CounterValue()

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        """Raises ValueError for a negative amount: a counter only goes up."""
        self.child(labels).inc(amount)

    def value(self, labels: Labels) -> float:
        """The count for `labels` (0 when never incremented)."""
        child = self._children.get(labels)
        return 0.0 if child is None else child.value

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.help, labels=self.labelnames)
        for labels, child in self._children.items():
            family.add_metric(labels, child.value)
        yield family


class _HistogramValues:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        """Per bucket, not cumulative; the last is +Inf."""
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class Histogram(_Family):
    def __init__(self, name: str, help_text: str, labelnames: Sequence[str],
                 buckets: Sequence[float]) -> None:
        self._bounds = tuple(buckets)
        self._les = (*(floatToGoString(bound) for bound in self._bounds), "+Inf")
        super().__init__(name, help_text, labelnames)

    def _new_child(self) -> _HistogramValues:
        return _HistogramValues(self._bounds)

    def observe(self, labels: Labels, value: float) -> None:
        self.child(labels).observe(value)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.help, labels=self.labelnames)
        for labels, child in self._children.items():
            family.add_metric(labels, list(zip(self._les, map(float, itertools.accumulate(
                child.counts)), strict=True)), child.sum)
        yield family
