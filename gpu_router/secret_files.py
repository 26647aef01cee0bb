"""Secrets kept in files: Redis's passwords and the control plane's admin token.

Each is made once (mode 0600, never overwritten, so every process and restart agrees on it) and
travels only in files, never on a command line, which every local user can read. Its form is
checked on every read: written into redis.conf and HTTP headers unquoted, a secret holds no
space, quote or control character.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from pathlib import Path

_SECRET = re.compile(r"[A-Za-z0-9._~+/=-]{16,256}")


class SecretFileError(ValueError):
    """A secret's file that is missing, unreadable, or holds no usable secret; names the file."""


def ensure_secret(path: Path, what: str) -> str:
    """The secret in `path`, made there (mode 0600, its directory 0700 when new) when absent;
    an existing one is kept. SecretFileError naming the file and `what` when it holds no usable
    one."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Written whole beside it, then linked into place: a process reading it meanwhile finds
        # no file or the whole secret, and of two making it at once one links, one finds it.
        descriptor, draft = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(descriptor, "w") as out:  # mkstemp: mode 0600
                out.write(secrets.token_urlsafe(32) + "\n")
            with contextlib.suppress(FileExistsError):
                os.link(draft, path)
        finally:
            os.unlink(draft)
    return read_secret(path, what)


def read_secret(path: Path, what: str) -> str:
    """The secret in `path`; SecretFileError naming the file and `what` when it cannot be
    used."""
    try:
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as cause:
        raise SecretFileError(f"{path}: cannot read {what}: {cause}") from cause
    if not _SECRET.fullmatch(secret):
        raise SecretFileError(
            f"{path}: {what} must be 16 to 256 characters of A-Z a-z 0-9 . _ ~ + / = -")
    return secret
