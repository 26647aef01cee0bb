"""PolicyWatcher: content changes roll out, touches and bad files do not."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from control_plane.watch import PolicyWatcher


class Rejected(Exception):
    pass


def prepare(path: Path) -> str:
    """Stands in for prepare_release: the text, or Rejected for a "bad" or unreadable file."""
    try:
        text = path.read_text()
    except OSError as error:
        raise Rejected(f"cannot read: {error}") from error
    if text.startswith("bad"):
        raise Rejected(f"{path}: line 1: not a policy")
    return text


def write(path: Path, text: str, mtime_ns: int) -> None:
    """Write and set a distinct mtime, so the poll sees a change whatever the clock granularity."""
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    write(path, "one", 1_000_000_000)
    return path


def test_only_content_changes_are_applied_and_bad_files_are_logged(
    policy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    applied: list[str] = []

    async def apply(release: str) -> None:
        applied.append(release)

    async def scenario() -> None:
        watcher = PolicyWatcher(policy, prepare, apply, (Rejected,))
        await watcher.check()
        write(policy, "one", 2_000_000_000)
        await watcher.check()
        write(policy, "two", 3_000_000_000)
        await watcher.check()
        await watcher.check()
        write(policy, "bad yaml", 4_000_000_000)
        await watcher.check()
        policy.unlink()
        await watcher.check()
        write(policy, "three", 5_000_000_000)
        await watcher.check()

    with caplog.at_level(logging.WARNING, logger="control_plane.watch"):
        asyncio.run(scenario())
    assert applied == ["two", "three"]
    rejected = [r for r in caplog.records if r.getMessage() == "policy_rejected"]
    assert [r.file for r in rejected] == [str(policy), str(policy)]  # type: ignore[attr-defined]
    assert "line 1: not a policy" in rejected[0].error  # type: ignore[attr-defined]
    assert "No such file" in rejected[1].error  # type: ignore[attr-defined]


def test_run_polls_until_cancelled(policy: Path) -> None:
    changed = asyncio.Event()

    async def apply(release: str) -> None:
        changed.set()

    async def scenario() -> None:
        watcher = PolicyWatcher(policy, prepare, apply, (Rejected,), interval_s=0.01)
        task = asyncio.create_task(watcher.run())
        write(policy, "two", 2_000_000_000)
        await asyncio.wait_for(changed.wait(), timeout=10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_a_changed_key_file_rolls_the_policy_out_again_and_reload_rereads_all(
    policy: Path, tmp_path: Path
) -> None:
    """The files `also` names (the policy's key files) count as part of it: a rotated key is
    prepared and applied like a policy edit; `reload` (SIGHUP) applies whatever changed."""
    key = tmp_path / "vast.key"
    write(key, "key-one", 1_000_000_000)
    applied: list[tuple[str, str]] = []

    def prepare_with_key(path: Path) -> tuple[str, str]:
        return prepare(path), key.read_text()

    async def apply(release: tuple[str, str]) -> None:
        applied.append(release)

    async def scenario() -> None:
        watcher = PolicyWatcher(policy, prepare_with_key, apply, (Rejected,), also=lambda: [key])
        await watcher.check()
        write(key, "key-one", 2_000_000_000)  # touched, same content
        await watcher.check()
        write(key, "key-two", 3_000_000_000)
        await watcher.check()
        await watcher.reload()

    asyncio.run(scenario())
    assert applied == [("one", "key-two"), ("one", "key-two")]
