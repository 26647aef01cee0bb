"""The certificates `gpu-router certs init` makes for a fleet on several hosts, and the names
they may take: a name is a file stem of the certs directory (pki.tls_files), so one whose files
would be another's (the CA's, the CRL, the control plane's, another name's) is refused, and a
Redis is named by the DNS name its clients dial and check."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path

from gpu_router.pki import (
    CA_FILE,
    CA_KEY_FILE,
    EXT_PROC_SERVER_NAME,
    SERVER_DNS,
    Identity,
    PkiError,
    Role,
    tls_files,
)
from gpu_router.redis_service import redis_user_problem
from gpu_router.revocation import CRL_FILE


def fleet(edges: Iterable[str], ext_procs: Iterable[str], redis: Iterable[str] = ()
          ) -> list[Identity]:
    """The control plane's identity and one per named edge node, ext_proc replica and Redis
    (named by the host name its clients dial); PkiError for a name the directory holds already
    (`ca`, ...), for a replica whose name cannot be a Redis user's, and for a Redis named as
    the control plane or ext_proc (their clients check those names) or by an IP address (a DNS
    name is what its certificate carries)."""
    named = [*(Identity(Role.EDGE, name) for name in edges),
             *(Identity(Role.EXT_PROC, name) for name in ext_procs),
             *(Identity(Role.REDIS, name) for name in redis)]
    taken = {CA_FILE, CA_KEY_FILE, CRL_FILE, *_files_of(Role.CONTROL_PLANE.value)}
    for identity in named:
        files = _files_of(identity.name)
        if not identity.name or "/" in identity.name or files & taken:
            raise PkiError(f"{identity.name!r} cannot name a certificate: its files would be "
                           f"those of another ({', '.join(sorted(files & taken))})")
        taken |= files
        problem = redis_user_problem(identity.name)
        if identity.role is Role.EXT_PROC and problem is not None:
            raise PkiError(f"--ext-proc {identity.name}: also the replica's Redis user: {problem}")
        if identity.role is Role.REDIS and (
                identity.name in (*SERVER_DNS, EXT_PROC_SERVER_NAME) or _is_ip(identity.name)):
            raise PkiError(f"--redis {identity.name}: a Redis needs a DNS name of its own")
    return [Identity(Role.CONTROL_PLANE, Role.CONTROL_PLANE.value), *named]


def _files_of(name: str) -> set[str]:
    """The file names of `name`'s pair, as tls_files names them."""
    pair = tls_files(Path(), name)
    return {pair.cert.name, pair.key.name}


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
