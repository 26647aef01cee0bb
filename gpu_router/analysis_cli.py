"""`gpu-router savings`, `replay`, `why` and `audit`: read the ledger, never route.

savings and why price with the policy given (default: the embedded one; pass the policy
being served); replay re-decides under the policy given; audit renders the booked rows as the
audit trail. See control_plane/ledger/savings.py, gpu_router/replay.py,
control_plane/ledger/why.py and control_plane/audit.py for what each can and cannot know.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from control_plane.audit import audit_line
from control_plane.ledger.audit_trail import TrailQuery, rows_after
from control_plane.ledger.report import ReportError, parse_window, read_only, window_start
from control_plane.ledger.savings import run_savings
from control_plane.ledger.store import default_ledger_path
from control_plane.ledger.why import UnknownRequestError, explain, render_why
from control_plane.policy.load import PolicyError, default_policy_path, load_policy_file
from control_plane.policy.model import RoutingConfig
from gpu_router.replay import render_replay, replay


def _guarded(name: str, body: Callable[[argparse.Namespace, RoutingConfig], str]
             ) -> Callable[[argparse.Namespace], int]:
    """Load the policy, run `body`, print its text; exit 2 with one line on a known error."""
    def handler(args: argparse.Namespace) -> int:
        try:
            config = load_policy_file(Path(args.policy) if args.policy else default_policy_path())
            print(body(args, config))
        except PolicyError as error:
            print(error, file=sys.stderr)
            return 2
        except (ReportError, UnknownRequestError) as error:
            print(f"gpu-router {name}: {error}", file=sys.stderr)
            return 2
        return 0
    return handler


def _savings(args: argparse.Namespace, config: RoutingConfig) -> str:
    return run_savings(args.ledger, config, args.since, args.format)


def _replay(args: argparse.Namespace, config: RoutingConfig) -> str:
    now = datetime.now(UTC)
    start = window_start(now, parse_window(args.since))
    result = replay(args.ledger, config, int(start.timestamp() * 1000),
                    int(now.timestamp() * 1000) + 1)
    if args.format == "json":
        return json.dumps({"policy": config.source, "since": start.isoformat(),
                           "until": now.isoformat(), **result.to_json()}, indent=2)
    return render_replay(result, config.source, f"{start:%Y-%m-%d %H:%M:%S}",
                         f"{now:%Y-%m-%d %H:%M:%S}")


def _why(args: argparse.Namespace, config: RoutingConfig) -> str:
    story = explain(args.ledger, config, args.request_id)
    return json.dumps(story, indent=2) if args.format == "json" else render_why(story)


FOLLOW_POLL_S = 0.5
"""How often --follow looks for newly booked rows (the ledger commits every 0.5 s)."""


def _audit(args: argparse.Namespace) -> int:
    """Print the audit trail as JSON lines; with --follow, go on printing what is booked until
    interrupted. Exit 2 with one line when the window or the ledger is unusable."""
    try:
        start = window_start(datetime.now(UTC), parse_window(args.since))
        query = TrailQuery(int(start.timestamp() * 1000), args.client)
        with read_only(Path(args.ledger)) as connection:
            after = 0
            while True:
                for row_id, row in rows_after(connection, query, after):
                    print(audit_line(row), flush=args.follow)
                    after = row_id
                if not args.follow:
                    return 0
                time.sleep(FOLLOW_POLL_S)
    except ReportError as error:
        print(f"gpu-router audit: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # the reader (head, a pager) stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _common(parser: argparse.ArgumentParser, policy_help: str) -> None:
    parser.add_argument("--policy", help=policy_help)
    parser.add_argument("--ledger", default=str(default_ledger_path()), help="the SQLite usage ledger")
    parser.add_argument("--format", choices=("table", "json"), default="table")


def add_analysis_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    savings = commands.add_parser("savings", help="what routing saved against single providers")
    savings.add_argument("--since", default="30d", help="window ending now: 1h, 24h, 30d ...")
    _common(savings, "the policy whose price sheets apply (default: the embedded default)")
    savings.set_defaults(handler=_guarded("savings", _savings))
    other = commands.add_parser("replay", help="re-decide recorded requests under another "
                                               "policy (sends no traffic)")
    other.add_argument("--since", default="24h", help="window ending now: 1h, 24h, 30d ...")
    _common(other, "the policy to replay under (default: the embedded default)")
    other.set_defaults(handler=_guarded("replay", _replay))
    why = commands.add_parser("why", help="one request's routing story from the ledger")
    why.add_argument("request_id", help="the edge's request id (x-request-id) or the client's")
    _common(why, "the policy whose prices are shown (default: the embedded default)")
    why.set_defaults(handler=_guarded("why", _why))
    audit = commands.add_parser("audit", help="the routing audit trail from the ledger, one JSON "
                                              "line per request in booking order")
    audit.add_argument("--since", default="1h", help="requests that started within: 15m, 1h, 24h ...")
    audit.add_argument("--client", help="only this client's requests (its key name in the policy)")
    audit.add_argument("--follow", action="store_true",
                       help="go on printing requests as they are booked, like tail -f")
    audit.add_argument("--ledger", default=str(default_ledger_path()), help="the SQLite usage ledger")
    audit.set_defaults(handler=_audit)
