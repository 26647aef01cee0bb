"""Watches the policy file, and the provider key files it names, and rolls out each new good
version of them: a rotated key (a file: credential) reaches Envoy over SDS within a poll. The
admin API's certificate and key are watched the same way (app.py).

Polling (stat every half second, then a content hash) instead of inotify: it works the
same on every filesystem, in containers with bind-mounted ConfigMaps (which swap a
symlink), and with editors that replace the file instead of writing it in place.
A bad file never reaches the fleet: it is logged and the last good config keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

R = TypeVar("R")


class PolicyWatcher(Generic[R]):
    """Calls `apply(prepare(path))` whenever the content of the file, or of one of the files
    `also()` names (asked again at every poll: the key files of the policy now served),
    changes.

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
        also: Callable[[], Iterable[Path]] = tuple,
        rejected: str = "policy_rejected",
    ) -> None:
        """`rejected`: the event logged, with the file and the error, when `prepare` refuses."""
        self._path = path
        self._rejected = rejected
        self._also = also
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
        await self.reload()

    async def reload(self) -> None:
        """Prepare and apply the files as they are now (on SIGHUP, changed or not)."""
        try:
            release = self._prepare(self._path)
        except self._rejections as error:
            log.warning(self._rejected, extra={"file": str(self._path), "error": str(error)})
            return
        await self._apply(release)

    def _paths(self) -> list[Path]:
        return [self._path, *self._also()]

    def _stat(self) -> tuple[tuple[int, int, int] | None, ...]:
        return tuple(_stat(path) for path in self._paths())

    def _read_digest(self) -> str:
        """Hash of every file's content (an unreadable one counts as such: prepare says why)."""
        digest = hashlib.sha256()
        for path in self._paths():
            try:
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                content = "unreadable"
            digest.update(f"{path}\0{content}\0".encode())
        return digest.hexdigest()


def _stat(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is written or renamed over (a key rotated by mv included)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino
