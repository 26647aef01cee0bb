"""Books what the gRPC access log missed, from the edges' durable request logs.

Envoy keeps no ALS entry while the control plane is down (see translate/durable_log.py), and a
SIGKILL loses the ledger rows of the last unwritten batch. Every edge also appends each client
request to <edge_log_dir>/<node>.access.jsonl; on start and then every `interval_s` the
reconciler reads each file from its committed position, and books, through `Accounting.book`
(which reads the entry as the gRPC path's receiver does, then books it as that path does),
every request neither in the ledger (looked up by its start time and id, the ledger's key) nor
booked by this process. Its new position goes to the ledger through the same batches, after
those rows, so a position on disk means everything before it is booked (store.py).

The files are bounded by freeing what has been reconciled: the committed prefix of each file
is deallocated (fallocate PUNCH_HOLE, whole 4 KiB blocks), so a file takes the disk space of its
unreconciled tail while Envoy keeps appending to it, and offsets never move. (`ls` shows the
apparent size, `du` the real one.) A file renamed away by logrotate (Envoy reopens its logs on
SIGUSR1 or POST /reopen_logs) is seen as a new inode and read from its start.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path

from envoy.data.accesslog.v3 import accesslog_pb2

from control_plane.accounting import Accounting
from control_plane.ledger.store import (
    RETENTION_DAYS,
    LogOffset,
    known_request_ids,
    open_ledger,
    read_offsets,
)
from control_plane.metrics import Metrics
from control_plane.telemetry.edge_file import EdgeLineError, entry_from_line
from control_plane.telemetry.samples import unix_ms
from control_plane.translate.durable_log import FILE_SUFFIX

INTERVAL_S = 5.0
MAX_READ_BYTES = 8 * 1024 * 1024
"""Per file per pass: a long backlog is read over several passes, run back to back."""
_BLOCK = 4096
_DAY_MS = 86_400_000
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    """The complete lines of one file between two offsets, as ALS entries."""

    path: str
    node: str
    inode: int
    start: int
    end: int
    """Just past the last complete line read."""
    entries: tuple[accesslog_pb2.HTTPAccessLogEntry, ...]
    full: bool
    """Stopped at MAX_READ_BYTES: more is waiting."""


def node_of(path: Path) -> str:
    return path.name.removesuffix(FILE_SUFFIX)


_REQUEST_ID = re.compile(rb'"request_id":"([^"\\]*)"')
"""The request id as the edge's JSON formatter writes it (durable_log.py)."""


def read_chunk(path: Path, committed: LogOffset | None, max_bytes: int = MAX_READ_BYTES,
               booked: Container[str] = ()) -> Chunk:
    """What `path` holds past its committed offset (from 0 when the file is new, rotated or
    truncated). A trailing partial line is left for the next pass; an unreadable line is
    logged and skipped. Lines whose request id is in `booked` (what this process booked from
    the gRPC log lately: nearly every line while it runs) are skipped unparsed: booking them
    would find them booked, and parsing each into an entry cost the control plane per request."""
    with path.open("rb") as file:
        stat = os.fstat(file.fileno())
        same = committed is not None and committed.inode == stat.st_ino
        start = committed.offset if same and committed.offset <= stat.st_size else 0
        file.seek(start)
        data = file.read(max_bytes)
    complete = data[:data.rfind(b"\n") + 1]
    entries = []
    for line in complete.splitlines():
        if not line.strip():
            continue
        found = set(_REQUEST_ID.findall(line))  # older lines' decisions repeat the same id
        if len(found) == 1 and found.pop().decode("utf-8", "replace") in booked:
            continue
        try:
            entries.append(entry_from_line(line))
        except EdgeLineError as error:
            log.warning("edge log line skipped", extra={"path": str(path), "error": str(error)})
    return Chunk(path=str(path), node=node_of(path), inode=stat.st_ino, start=start,
                 end=start + len(complete), entries=tuple(entries),
                 full=len(data) == max_bytes)


class HolePuncher:
    """Frees a file's reconciled prefix; off for good (logged once) where unsupported."""

    def __init__(self) -> None:
        self._fallocate: Callable[..., int] | None = None
        self._done: dict[tuple[str, int], int] = {}
        library = ctypes.util.find_library("c")
        if library is not None:
            libc = ctypes.CDLL(library, use_errno=True)
            function = libc.fallocate
            function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
            self._fallocate = function

    def free(self, offset: LogOffset) -> None:
        end = offset.offset // _BLOCK * _BLOCK
        key = (offset.path, offset.inode)
        if self._fallocate is None or end <= self._done.get(key, 0):
            return
        try:
            fd = os.open(offset.path, os.O_WRONLY)
        except FileNotFoundError:
            return
        try:
            if os.fstat(fd).st_ino != offset.inode:
                return
            if self._fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, end) != 0:
                code = ctypes.get_errno()
                if code in (errno.EOPNOTSUPP, errno.ENOSYS):
                    log.warning("edge logs are not bounded: this filesystem cannot punch holes",
                                extra={"path": offset.path})
                    self._fallocate = None
                    return
                raise OSError(code, os.strerror(code), offset.path)
            self._done[key] = end
        finally:
            os.close(fd)


class Reconciler:
    """Scans on a worker thread; books on the event loop (where the gRPC path books too)."""

    def __init__(self, directory: Path, ledger_path: Path, accounting: Accounting,
                 metrics: Metrics, *, interval_s: float = INTERVAL_S,
                 retention_days: float = RETENTION_DAYS,
                 clock: Callable[[], float] = time.time) -> None:
        self._directory = directory
        self._ledger_path = ledger_path
        self._accounting = accounting
        self._metrics = metrics
        self._interval_s = interval_s
        self._retention_ms = int(retention_days * _DAY_MS)
        self._clock = clock
        self._connection: sqlite3.Connection | None = None
        self._punch = HolePuncher()

    async def run(self) -> None:
        """One pass at once, then one every interval_s (back to back while a backlog lasts)."""
        while True:
            more = await self.reconcile_once()
            if not more:
                await asyncio.sleep(self._interval_s)

    async def reconcile_once(self) -> bool:
        """Book every request the files hold and the ledger lacks; whether more is waiting."""
        chunks, known = await asyncio.to_thread(self._scan)
        horizon_ms = int(self._clock() * 1000) - self._retention_ms
        for chunk in chunks:
            booked = sum(
                self._accounting.book(entry, chunk.node) for entry in chunk.entries
                if entry.request.request_id not in known
                and unix_ms(entry.common_properties.start_time) >= horizon_ms)
            if booked:
                self._metrics.count_reconciled(chunk.node, booked)
                log.info("requests booked from an edge log", extra={
                    "node": chunk.node, "requests": booked, "path": chunk.path})
            if chunk.end != chunk.start:
                self._accounting.mark_offset(
                    LogOffset(path=chunk.path, inode=chunk.inode, offset=chunk.end))
        return any(chunk.full for chunk in chunks)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _scan(self) -> tuple[list[Chunk], set[str]]:
        """New lines of every edge file, and which of their ids the ledger already has; frees
        what earlier passes committed."""
        if self._connection is None:
            self._connection = open_ledger(self._ledger_path)
        committed = read_offsets(self._connection)
        for offset in committed.values():
            self._punch.free(offset)
        chunks = []
        for path in sorted(self._directory.glob(f"*{FILE_SUFFIX}")):
            try:
                chunks.append(read_chunk(path, committed.get(str(path)),
                                         booked=self._accounting.booked))
            except FileNotFoundError:
                continue
        keys = [(unix_ms(entry.common_properties.start_time), entry.request.request_id)
                for chunk in chunks for entry in chunk.entries]
        return chunks, known_request_ids(self._connection, keys)
