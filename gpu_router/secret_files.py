"""Secrets kept in files: Redis's passwords and the control plane's admin token.

Each is made once (mode 0600, never overwritten, so every process and restart agrees on it) and
travels only in files, never on a command line, which every local user can read. Its form is
checked on every read: written into redis.conf and HTTP headers unquoted, a secret holds no
space, quote or control character.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

_SECRET = re.compile(r"[A-Za-z0-9._~+/=-]{16,256}")


class SecretFileError(ValueError):
    """A secret's file that is missing, unreadable, or holds no usable secret; names the file."""


def ensure_secret(path: Path, what: str, error: type[SecretFileError] = SecretFileError) -> Path:
    """`path`, made (mode 0600, its directory 0700 when new) with a random secret when absent;
    an existing one is kept. `error` (naming the file and `what`) when it holds no usable one."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it meanwhile: its secret is the one
        else:
            with os.fdopen(descriptor, "w") as out:
                out.write(secrets.token_urlsafe(32) + "\n")
    read_secret(path, what, error)
    return path


def read_secret(path: Path, what: str, error: type[SecretFileError] = SecretFileError) -> str:
    """The secret in `path`; `error` naming the file and `what` when it cannot be used."""
    try:
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as cause:
        raise error(f"{path}: cannot read {what}: {cause}") from cause
    if not _SECRET.fullmatch(secret):
        raise error(f"{path}: {what} must be 16 to 256 characters of A-Z a-z 0-9 . _ ~ + / = -")
    return secret
