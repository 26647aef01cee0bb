"""Exact nearest-rank latency percentiles per provider from the ledger, in bounded memory.

Sorting every latency of a 10M-row window in Python costs gigabytes. Instead, two passes in
SQLite: a histogram of total_ms in log buckets 0.5 % wide (GROUP BY provider, bucket: a few
thousand counts) tells which bucket holds each wanted rank; a second pass fetches only the
latencies of those buckets, and the rank inside its bucket picks the exact value. Python
holds the counts and those few buckets, never the window.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence

ALL = None
"""The group key of every row, whatever its provider."""
_BUCKETS_PER_E = 200
_BUCKET = f"CAST(floor(ln(max(total_ms, 0.001)) * {_BUCKETS_PER_E}) AS INTEGER)"

Group = str | None
"""A provider name, or ALL."""


def _locate(counts: Mapping[int, int], rank: int) -> tuple[int, int]:
    """(bucket holding the rank-th smallest value (0-based), its rank inside that bucket)."""
    for bucket in sorted(counts):
        if rank < counts[bucket]:
            return bucket, rank
        rank -= counts[bucket]
    raise ValueError(f"rank {rank} beyond the histogram")


BUCKET = _BUCKET
"""The SQL expression of a row's histogram bucket: GROUP BY it to count."""


def histogram_of(counts: Iterable[tuple[str, int, int]]) -> dict[Group, dict[int, int]]:
    """(provider, bucket, requests) groups -> per provider and ALL, bucket -> requests."""
    histogram: dict[Group, dict[int, int]] = {ALL: {}}
    for provider, bucket, count in counts:
        mine = histogram.setdefault(provider, {})
        mine[bucket] = mine.get(bucket, 0) + count
        histogram[ALL][bucket] = histogram[ALL].get(bucket, 0) + count
    return histogram


def _ranks(histogram: dict[Group, dict[int, int]], fractions: Sequence[float]
           ) -> dict[tuple[Group, float], tuple[int, int]]:
    """(group, fraction) -> (bucket, rank inside it) of each nearest rank (empty groups left out)."""
    wanted: dict[tuple[Group, float], tuple[int, int]] = {}
    for group, counts in histogram.items():
        total = sum(counts.values())
        for fraction in fractions:
            if total:
                wanted[group, fraction] = _locate(counts, max(math.ceil(fraction * total) - 1, 0))
    return wanted


def bucketed_percentiles(histogram: dict[Group, dict[int, int]], fractions: Sequence[float],
                         middle: Callable[[int], float]
                         ) -> dict[Group, dict[float, float | None]]:
    """{group: {fraction: middle(bucket of the nearest rank)}}: no second pass over the rows,
    so as exact as the buckets are narrow."""
    result: dict[Group, dict[float, float | None]] = {
        group: dict.fromkeys(fractions) for group in histogram}
    for (group, fraction), (bucket, _) in _ranks(histogram, fractions).items():
        result[group][fraction] = middle(bucket)
    return result


def latency_percentiles(connection: sqlite3.Connection, since_unix_ms: int,
                        fractions: Sequence[float], histogram: dict[Group, dict[int, int]]
                        ) -> dict[Group, dict[float, float | None]]:
    """{provider or ALL: {fraction: nearest-rank total_ms}} over rows at or after since, given
    their histogram (GROUP BY provider, BUCKET; histogram_of)."""
    wanted = _ranks(histogram, fractions)
    values = _bucket_values(connection, since_unix_ms,
                            {(group, bucket) for (group, _), (bucket, _) in wanted.items()})
    result: dict[Group, dict[float, float | None]] = {
        group: dict.fromkeys(fractions) for group in histogram}
    for (group, fraction), (bucket, rank) in wanted.items():
        result[group][fraction] = values[group, bucket][rank]
    return result


def _bucket_values(connection: sqlite3.Connection, since_unix_ms: int,
                   buckets: Iterable[tuple[Group, int]]
                   ) -> dict[tuple[Group, int], list[float]]:
    """The sorted latencies in each (group, bucket), from one scan of the window."""
    wanted = set(buckets)
    if not wanted:
        return {}
    any_provider = sorted({bucket for group, bucket in wanted if group is ALL})
    per_provider = sorted((group, bucket) for group, bucket in wanted if group is not ALL)
    conditions = [f"b IN ({', '.join('?' * len(any_provider))})"] if any_provider else []
    conditions += ["(provider = ? AND b = ?)"] * len(per_provider)
    parameters: list[object] = [since_unix_ms, *any_provider]
    for group, bucket in per_provider:
        parameters += [group, bucket]
    found: dict[tuple[Group, int], list[float]] = {key: [] for key in wanted}
    for provider, bucket, total_ms in connection.execute(
            f"SELECT provider, b, total_ms FROM (SELECT provider, {_BUCKET} AS b, total_ms "
            f"FROM requests WHERE at_unix_ms >= ?) WHERE {' OR '.join(conditions)}", parameters):
        for key in ((ALL, bucket), (provider, bucket)):
            if key in found:
                found[key].append(total_ms)
    for group in found.values():
        group.sort()
    return found
