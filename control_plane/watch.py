"""Watches the policy file and rolls out each new good version of it.

Polling (stat every half second, then a content hash) instead of inotify: it works the
same on every filesystem, in containers with bind-mounted ConfigMaps (which swap a
symlink), and with editors that replace the file instead of writing it in place.
A bad file never reaches the fleet: it is logged and the last good config keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

R = TypeVar("R")


class PolicyWatcher(Generic[R]):
    """Calls `apply(prepare(path))` whenever the file's content changes.

    `prepare` raises one of `rejections` for a file that must not be rolled out.
    Construct it before the startup load, so a change in between is not missed.
    """

    def __init__(
        self,
        path: Path,
        prepare: Callable[[Path], R],
        apply: Callable[[R], Awaitable[None]],
        rejections: tuple[type[Exception], ...],
        interval_s: float = 0.5,
    ) -> None:
        self._path = path
        self._prepare = prepare
        self._apply = apply
        self._rejections = rejections
        self._interval_s = interval_s
        self._fingerprint = self._stat()
        self._digest = self._read_digest()

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self._interval_s)
            await self.check()

    async def check(self) -> None:
        """One poll: roll out the file if its content changed since the last look."""
        fingerprint = self._stat()
        if fingerprint == self._fingerprint:
            return
        self._fingerprint = fingerprint
        digest = self._read_digest()
        if digest == self._digest:
            return
        self._digest = digest
        try:
            release = self._prepare(self._path)
        except self._rejections as error:
            log.warning("policy_rejected", extra={"file": str(self._path), "error": str(error)})
            return
        await self._apply(release)

    def _stat(self) -> tuple[int, int] | None:
        try:
            stat = self._path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _read_digest(self) -> str | None:
        """Content hash, or None when unreadable (prepare then reports why)."""
        try:
            return hashlib.sha256(self._path.read_bytes()).hexdigest()
        except OSError:
            return None
