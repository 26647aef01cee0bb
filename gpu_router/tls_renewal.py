"""When a process's TLS files (pki.TlsFiles) were renewed: what lets the fleet's gRPC ports and
clients and its Redis clients take a new certificate without a restart (grpc_tls.py,
redis_client.py). Each asks before it makes a new connection; connections already open keep the
pair they were made with."""

from __future__ import annotations

import logging
import os
import threading

from gpu_router.pki import TlsFiles, pair_problem

_log = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int, int] | None, ...]


class Renewal:
    """`renewed()` is True once for each change of the files that checks (pki.pair_problem:
    readable PEM, the key the certificate's; logged `tls_reloaded`). A change that does not
    check is logged once (`tls_rejected`) and looked at again when the files change again, so a
    renewal that replaces the certificate and the key one after the other is taken once both
    are in place. Three stat() calls a question; thread-safe (gRPC asks from its own threads)."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._seen = _stamp(files)

    def renewed(self) -> bool:
        stamp = _stamp(self.files)
        with self._lock:
            if stamp == self._seen:
                return False
            self._seen = stamp
        problem = pair_problem(self.files)
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
