"""Joins upstream attempts with the model their client request was for, by request id.

An attempt entry knows its provider but not the model (samples.py says why); the request's own
entry knows the model ext_proc decided. They arrive on two ALS streams, each flushed on its own
timer, so either may come first: whichever arrives first waits here for the other, keyed by
x-request-id. A failed attempt of a long (streaming) request waits as long as the request
lasts, so attempts wait up to `attempt_ttl_s`; a request's model only needs to outlive the
flush skew between the streams, so it waits `model_ttl_s`. Both are bounded in count too; the
oldest are dropped first. Pure: time is passed in.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Generic, TypeVar

from control_plane.telemetry.samples import RequestSample

_T = TypeVar("_T")


class _ExpiringMap(Generic[_T]):
    """Insertion-ordered map whose entries expire after a fixed time or when it is full."""

    def __init__(self, ttl_ms: int, max_entries: int) -> None:
        self._ttl_ms = ttl_ms
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[int, _T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def setdefault(self, key: str, value: _T, now_ms: int) -> _T:
        self.expire(now_ms)
        found = self._entries.get(key)
        if found is not None:
            return found[1]
        self._entries[key] = (now_ms + self._ttl_ms, value)
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return value

    def get(self, key: str, now_ms: int) -> _T | None:
        self.expire(now_ms)
        found = self._entries.get(key)
        return None if found is None else found[1]

    def pop(self, key: str, now_ms: int) -> _T | None:
        self.expire(now_ms)
        found = self._entries.pop(key, None)
        return None if found is None else found[1]

    def expire(self, now_ms: int) -> None:
        entries = self._entries
        while entries:
            key, (expires_at, _) = next(iter(entries.items()))
            if expires_at > now_ms:
                return
            del entries[key]


class ModelAttribution:
    """Gives each attempt sample its request's model once both have been seen."""

    def __init__(
        self,
        attempt_ttl_s: float = 600.0,
        model_ttl_s: float = 5.0,
        max_pending: int = 100_000,
    ) -> None:
        if attempt_ttl_s <= 0 or model_ttl_s <= 0 or max_pending < 1:
            raise ValueError(
                f"TTLs must be > 0 and max_pending >= 1, "
                f"got {attempt_ttl_s}, {model_ttl_s}, {max_pending}"
            )
        self._attempts: _ExpiringMap[list[RequestSample]] = _ExpiringMap(
            int(attempt_ttl_s * 1000), max_pending
        )
        self._models: _ExpiringMap[str] = _ExpiringMap(int(model_ttl_s * 1000), max_pending)

    @property
    def pending(self) -> int:
        """Attempts' requests and requests' models still waiting for their other half."""
        return len(self._attempts) + len(self._models)

    def attempt(self, sample: RequestSample, now_ms: int) -> RequestSample | None:
        """The attempt with its model, stamped now, when its request was seen; else it waits."""
        if not sample.request_id:
            return None
        model = self._models.get(sample.request_id, now_ms)
        if model is None:
            self._attempts.setdefault(sample.request_id, [], now_ms).append(sample)
            return None
        return dataclasses.replace(sample, model=model, at_unix_ms=now_ms) if model else None

    def request(self, request_id: str, model: str, now_ms: int) -> list[RequestSample]:
        """The attempts of this request seen so far, with its model and stamped now.

        A request without a model (ext_proc did not decide) releases its attempts unattributed:
        they were counted for their provider already.
        """
        if not request_id:
            return []
        waiting = self._attempts.pop(request_id, now_ms) or []
        # Remembered even when empty, so that late attempts of it do not wait in vain.
        self._models.setdefault(request_id, model, now_ms)
        if not model:
            return []
        return [dataclasses.replace(sample, model=model, at_unix_ms=now_ms) for sample in waiting]
