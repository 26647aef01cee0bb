"""Secrets in files (gpu_router/secret_files.py): made once, whole, whoever comes first."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gpu_router.secret_files import ensure_secret


def test_many_makers_at_once_agree_on_one_whole_secret(tmp_path: Path) -> None:
    """The control plane and the Stack may make the admin token at once: each finds the file
    whole (never empty or half written) and all read the same secret; no draft is left."""
    for attempt in range(20):
        path = tmp_path / f"round-{attempt}" / "secret"

        def make(_: int, path: Path = path) -> str:
            return ensure_secret(path, "the secret")

        with ThreadPoolExecutor(16) as pool:
            secrets = set(pool.map(make, range(16)))
        assert len(secrets) == 1
        assert [p.name for p in path.parent.iterdir()] == ["secret"]
        assert path.stat().st_mode & 0o777 == 0o600
