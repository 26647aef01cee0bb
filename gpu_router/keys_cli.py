"""`gpu-router keys new|list` and `gpu-router report --by client`.

A key is "gr-" and 32 random bytes from `secrets` (256 bits, url-safe base64). It is printed
once; the policy holds only its SHA-256, which is all the edge compares (ext_proc hashes the
presented key). Lose a key and you issue a new one: nothing can recover it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from control_plane.ledger.client_report import (
    client_rows,
    ledger_rows,
    render_clients,
    render_usage,
    to_json,
    usage_by_client,
)
from control_plane.ledger.report import ReportError, parse_window, window_start
from control_plane.ledger.store import default_ledger_path
from control_plane.policy.clients import CLIENT_NAME
from control_plane.policy.load import PolicyError, default_policy_path, load_policy_file

KEY_PREFIX = "gr-"
KEY_BYTES = 32
LIST_WINDOW_S = 30 * 86400
"""`keys list` shows a client without a budget over this window."""


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def key_sha256(key: str) -> str:
    """What the policy's key_sha256 holds (and what ext_proc compares)."""
    return hashlib.sha256(key.encode()).hexdigest()


def keys_new(args: argparse.Namespace) -> int:
    if not CLIENT_NAME.fullmatch(args.name):
        print(f"gpu-router keys new: invalid client name {args.name!r}: letters, digits, "
              "'.', '-' or '_'", file=sys.stderr)
        return 2
    key = new_key()
    digest = key_sha256(key)
    if args.format == "json":
        print(json.dumps({"name": args.name, "key": key, "sha256": digest}))
        return 0
    print(f"key for {args.name} (shown once, store it now; the policy keeps only its hash):\n\n"
          f"  {key}\n\nadd to the policy's clients:\n\n"
          f"clients:\n  - name: {args.name}\n    key_sha256: \"{digest}\"\n"
          f"    # budget: {{usd: 100, per: 30d}}\n"
          f"    # limits: {{requests_per_minute: 600, tokens_per_minute: 200000}}\n"
          f"    # models: [llama-3.1-8b]\n    # policy: batch\n\n"
          f"clients send it as 'Authorization: Bearer <key>' (the OpenAI SDK's api_key) "
          f"or 'x-api-key: <key>'")
    return 0


def keys_list(args: argparse.Namespace) -> int:
    policy = Path(args.policy) if args.policy else default_policy_path()
    try:
        config = load_policy_file(policy)
        rows = client_rows(config.clients, Path(args.ledger), int(time.time() * 1000),
                           LIST_WINDOW_S) if config.clients else []
    except PolicyError as error:
        print(error, file=sys.stderr)
        return 2
    except ReportError as error:
        print(f"gpu-router keys list: {error}", file=sys.stderr)
        return 2
    print(to_json(rows) if args.format == "json" else render_clients(rows))
    return 0


def client_report(ledger: str, since_text: str, fmt: str) -> str:
    """What `gpu-router report --by client` prints; ReportError as for the provider report."""
    now = datetime.now(UTC)
    start = window_start(now, parse_window(since_text))
    usages = usage_by_client(ledger_rows(Path(ledger), int(start.timestamp() * 1000)))
    if fmt == "json":
        return to_json(usages)
    return render_usage(usages, f"gpu-router usage by client {start:%Y-%m-%d %H:%M:%S} .. "
                                f"{now:%Y-%m-%d %H:%M:%S} UTC")


def add_keys_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys = commands.add_parser("keys", help="issue client keys; list clients, budgets and spend")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    new = actions.add_parser("new", help="print a new key (once) and its policy entry")
    new.add_argument("name", help="the client's name in the policy")
    new.add_argument("--format", choices=("text", "json"), default="text")
    new.set_defaults(handler=keys_new)
    listing = actions.add_parser("list", help="each client's budget, spend in its window and "
                                              "limits (never a key)")
    listing.add_argument("--policy", help="policy YAML (default: the embedded default policy)")
    listing.add_argument("--ledger", default=str(default_ledger_path()),
                         help="the SQLite usage ledger")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    listing.set_defaults(handler=keys_list)
