"""The operator's token for the control plane's admin HTTP API (control_plane/admin_http.py).

One file, ADMIN_TOKEN_FILE in the control plane's certs directory unless --admin-token-file
names another, made (mode 0600) on the control plane's first start, or by the Stack before it
starts one; every client of the API (`gpu-router health`, the Stack) reads it from there.
"""

from __future__ import annotations

from pathlib import Path

from gpu_router.secret_files import ensure_secret, read_secret

ADMIN_TOKEN_FILE = "admin-token"
_WHAT = "the admin token"


def admin_token(path: Path) -> str:
    """The token in `path`, made there when absent; SecretFileError naming the file when it
    holds no usable one."""
    return ensure_secret(path, _WHAT)


def read_admin_token(path: Path) -> str:
    """The token in `path`, for a client of the API (which makes none: the control plane's is
    the one); SecretFileError naming the file when it cannot be used."""
    return read_secret(path, _WHAT)


def bearer(token: str) -> dict[str, str]:
    """The header that carries the token to the API."""
    return {"Authorization": f"Bearer {token}"}
