"""`gpu-router report`: window parsing, the per-provider math, the table and the JSON."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from usage_fixtures import make_record

from control_plane.ledger.report import (
    ReportError,
    build_report,
    parse_window,
    render_table,
    run_report,
    to_json,
)
from control_plane.ledger.store import LedgerWriter, ledger_row
from control_plane.usage.normalise import normalise
from gpu_router import cli

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


@pytest.mark.parametrize(("text", "delta"), [
    ("15m", timedelta(minutes=15)), ("1h", timedelta(hours=1)), ("24h", timedelta(hours=24)),
    ("30d", timedelta(days=30)), ("90s", timedelta(seconds=90)), (" 2h ", timedelta(hours=2))])
def test_parse_window(text: str, delta: timedelta) -> None:
    assert parse_window(text) == delta


@pytest.mark.parametrize("text", ["", "1", "h", "1w", "-1h", "1.5h", "0h", "1 h", "1H"])
def test_bad_window_says_what_is_accepted(text: str) -> None:
    with pytest.raises(ReportError, match=r"invalid window .*e\.g\. 15m, 1h, 24h, 30d"):
        parse_window(text)


def write_ledger(path: Path, rows: list[tuple[int, str, int, float, float]]) -> None:
    """rows: (age_s, provider, status, total_ms, cost_usd)."""
    writer = LedgerWriter(path)
    for index, (age_s, provider, status, total_ms, cost) in enumerate(rows):
        record = make_record(request_id=f"r{index}", at_unix_ms=NOW_MS - age_s * 1000,
                             provider=provider, status=status, total_ms=total_ms)
        usage_format = "none" if provider == "vast" else "openai"
        writer.add(ledger_row(record, normalise(record, usage_format), cost))
    writer.close()


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    rows = [(60, "coreweave", 200, float(ms), 0.003) for ms in range(1, 101)]  # 100 requests
    rows += [(120, "vast", 200, 500.0, 0.001)] * 8 + [(120, "vast", 429, 5.0, 0.0),
                                                    (120, "vast", 503, 7.0, 0.0)]
    rows += [(30, "", 503, 2.0, 0.0)]  # nobody could serve it
    rows += [(30, "coreweave", 400, 3.0, 0.0)]  # the client's mistake: not an error
    rows += [(7200, "lambda", 200, 80.0, 5.0)]  # outside a 1h window
    write_ledger(path, rows)
    return path


def test_report_math_per_provider(ledger: Path) -> None:
    report = build_report(ledger, timedelta(hours=1), NOW)
    by_name = {stats.provider: stats for stats in report.providers}
    assert [s.provider for s in report.providers] == ["coreweave", "vast"], "no '(none)' provider"
    coreweave, vast = by_name["coreweave"], by_name["vast"]
    assert coreweave.requests == 101
    assert coreweave.spend_usd == pytest.approx(0.3)
    assert coreweave.cost_per_request_usd == pytest.approx(0.3 / 101)
    assert coreweave.spend_share == pytest.approx(0.3 / 0.308)
    assert (coreweave.p50_ms, coreweave.p99_ms) == (50.0, 99.0), "nearest rank over 1..100 + 3"
    assert coreweave.error_rate == 0.0 and coreweave.rate_429 == 0.0
    assert vast.requests == 10 and vast.spend_share == pytest.approx(0.008 / 0.308)
    assert vast.error_rate == pytest.approx(0.2) and vast.rate_429 == pytest.approx(0.1)
    assert vast.estimated == 10 and coreweave.estimated == 101
    assert (vast.p50_ms, vast.p99_ms) == (500.0, 500.0)
    assert (report.unrouted.requests, report.unrouted.by_status) == (1, {"503": 1})
    total = report.total
    assert total.requests == 112
    assert total.spend_usd == pytest.approx(0.308)
    assert total.spend_share == pytest.approx(1.0)
    assert total.error_rate == pytest.approx(3 / 112)


def test_the_window_selects_rows(ledger: Path) -> None:
    assert build_report(ledger, timedelta(days=30), NOW).total.requests == 113
    assert build_report(ledger, timedelta(seconds=90), NOW).total.requests == 102
    empty = build_report(ledger, timedelta(seconds=1), NOW)
    assert empty.providers == () and empty.total.requests == 0 and empty.total.p50_ms is None
    assert "(no routed requests in this window)" in render_table(empty)


def test_table_is_aligned_and_readable(ledger: Path) -> None:
    table = render_table(build_report(ledger, timedelta(hours=1), NOW))
    lines = table.splitlines()
    assert lines[0] == "gpu-router usage 2024-05-01 11:00:00 .. 2024-05-01 12:00:00 UTC"
    header = lines[2]
    assert header.split()[:3] == ["provider", "requests", "spend"]
    rows = [line for line in lines if line.startswith(("coreweave", "vast", "total"))]
    assert len(rows) == 3
    assert "not routed (never reached a provider): 1 (1 x 503)" in lines
    ends = {len(line) for line in [header, *rows]}
    assert len(ends) == 1, "numbers are right-aligned to the same column end"
    coreweave = rows[0].split()
    assert coreweave[:5] == ["coreweave", "101", "0.300000", "97.4%", "0.00297030"]


def test_json_has_every_figure(ledger: Path) -> None:
    data = to_json(build_report(ledger, timedelta(hours=1), NOW))
    assert data["since"] == "2024-05-01T11:00:00+00:00"
    assert [p["provider"] for p in data["providers"]] == ["coreweave", "vast"]
    assert data["unrouted"] == {"requests": 1, "by_status": {"503": 1}}
    assert set(data["total"]) == {"provider", "requests", "spend_usd", "spend_share",
                                  "cost_per_request_usd", "p50_ms", "p99_ms", "error_rate",
                                  "rate_429", "estimated"}
    json.dumps(data)


def test_run_report_is_the_cli_in_one_call(ledger: Path) -> None:
    data = json.loads(run_report(ledger, "30d", "json", now=NOW))
    assert data["total"]["requests"] == 113
    assert json.loads(run_report(ledger, "30d", "json"))["total"]["requests"] == 0, "ends now"
    assert run_report(ledger, "30d", "table").splitlines()[0].startswith("gpu-router usage")
    with pytest.raises(ReportError, match="unknown format 'yaml'"):
        run_report(ledger, "1h", "yaml")
    with pytest.raises(ReportError, match="invalid window"):
        run_report(ledger, "yesterday", "table")


def test_missing_ledger_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no usage ledger at"):
        run_report(tmp_path / "absent.db", "1h", "table")
    assert not (tmp_path / "absent.db").exists(), "reporting never creates a ledger"


@pytest.mark.parametrize(("text", "message"), [
    ("99999999d", r"window of 99999999 days starts before 1970-01-01: at most 19844d"),
    ("9999999999999d", r"window '9999999999999d' is too long"),
    ("99999999999999999999s", r"window '99999999999999999999s' is too long"),
])
def test_a_window_reaching_before_1970_is_a_clear_error(ledger: Path, text: str,
                                                        message: str) -> None:
    with pytest.raises(ReportError, match=message):
        run_report(ledger, text, "table", now=NOW)


def test_the_cli_prints_the_error_for_an_absurd_window(
        ledger: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", "--since", "99999999d", "--ledger", str(ledger)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu-router report: window of 99999999 days") and "Traceback" not in err
