"""What a process makes of its TLS files (pki.TlsFiles), made anew when the files are renewed:
what lets the fleet's gRPC ports and its Redis clients take a new certificate without a restart
(grpc_tls.py, redis_client.py). Each asks before it makes a new connection; connections already
open keep the pair they were made with."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from gpu_router.pki import TlsFiles, pair_problem

_log = logging.getLogger(__name__)

T = TypeVar("T")
_Stamp = tuple[tuple[int, int, int] | None, ...]


class Renewing(Generic[T]):
    """`current`: what `make` made of the files when they last changed and checked. `refresh()`
    looks at the files (three stat() calls) and remakes it when they changed, checked
    (pki.pair_problem: readable PEM, the key the certificate's) and made (logged
    `tls_reloaded`); a change that does not check or make is logged once (`tls_rejected`) and
    looked at again when the files change again, so a renewal that replaces the certificate and
    the key one after the other is taken once both are in place. Thread-safe (gRPC asks from
    its own threads)."""

    def __init__(self, files: TlsFiles, make: Callable[[TlsFiles], T]) -> None:
        self.files = files
        self._make = make
        self._lock = threading.Lock()
        self._seen = _stamp(files)
        self.current = make(files)

    def refresh(self) -> bool:
        """Whether `current` was made anew now."""
        stamp = _stamp(self.files)
        with self._lock:
            if stamp == self._seen:
                return False
            self._seen = stamp
            problem = pair_problem(self.files)
            if problem is None:
                try:
                    self.current = self._make(self.files)
                except OSError as error:  # replaced again since it was checked (ssl.SSLError too)
                    problem = str(error)
        if problem is not None:
            _log.warning("tls_rejected", extra={"file": str(self.files.cert), "error": problem})
            return False
        _log.info("tls_reloaded", extra={"file": str(self.files.cert)})
        return True


def _stamp(files: TlsFiles) -> _Stamp:
    """What tells a file replaced or rewritten: (inode, mtime in ns, size) per file, None for
    one that is not there."""
    stamps = []
    for path in (files.ca, files.cert, files.key):
        try:
            status = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((status.st_ino, status.st_mtime_ns, status.st_size))
    return tuple(stamps)
