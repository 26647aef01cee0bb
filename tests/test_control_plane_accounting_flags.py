"""The control plane's accounting flags: retention, audit rotation, the edges' durable log."""

from __future__ import annotations

from pathlib import Path

import pytest

from control_plane.options import parse_args


def test_defaults_keep_90_days_and_5_audit_files_of_100_mib_and_no_edge_log() -> None:
    options = parse_args([])
    assert (options.ledger_retention_days, options.audit_max_bytes, options.audit_keep) == (
        90, 100 * 1024 * 1024, 5)
    assert options.edge_log_dir is None and options.edge_settings().edge_log_dir is None


def test_the_edge_log_directory_reaches_the_edges_as_an_absolute_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    options = parse_args(["--edge-log-dir", "logs", "--ledger-retention-days", "7",
                          "--audit-max-bytes", "1000", "--audit-keep", "2"])
    assert options.edge_settings().edge_log_dir == str(tmp_path / "logs")
    assert (options.ledger_retention_days, options.audit_max_bytes, options.audit_keep) == (
        7, 1000, 2)
    assert parse_args(["--edge-log-dir", "logs", "--no-accounting"]).edge_log_dir is None


@pytest.mark.parametrize("flag", ["--ledger-retention-days", "--audit-max-bytes"])
def test_a_retention_or_size_must_be_positive(flag: str) -> None:
    with pytest.raises(SystemExit):
        parse_args([flag, "0"])
