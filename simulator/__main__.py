"""`python -m simulator`: run simulated GPU providers until SIGTERM or SIGINT.

  python -m simulator [--policy FILE] [--all-providers] [--only NAME ...]
                      [--provider NAME=PORT --model ID ...] [--host ADDRESS]

Without --policy and --provider, simulates the loopback providers of the embedded default policy.
--all-providers also simulates the policy's http providers on other hosts (in Compose, base URLs
name the simulator's service); every provider listens on --host (0.0.0.0 in a container).
Logs one JSON object per line on stderr; exits 2 on a bad command line or policy, 1 when a port
cannot be bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from simulator.fleet import Fleet, FleetError, adhoc_spec, default_policy_path, load_fleet, select
from simulator.server import ProviderSim

log = logging.getLogger("simulator")


class StartError(RuntimeError):
    """A provider could not start listening (usually: its port is taken)."""


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus the record's `fields` extra."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(time.time(), 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulator", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--policy",
        type=Path,
        help="policy YAML whose loopback providers to simulate (default: embedded)",
    )
    parser.add_argument(
        "--all-providers",
        action="store_true",
        help="simulate every plain-http provider of the policy, whatever its host",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address every simulated provider listens on (default %(default)s)",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="simulate only this policy provider (repeatable)",
    )
    parser.add_argument(
        "--provider",
        action="append",
        default=[],
        metavar="NAME=PORT",
        help="an ad hoc provider with the generic profile (repeatable)",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="ID",
        help="a model id the ad hoc providers serve (repeatable)",
    )
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> Fleet:
    """The providers the command line asks for."""
    policy = args.policy or (None if args.provider else default_policy_path())
    if args.only and policy is None:
        raise FleetError("--only selects from a policy file; give --policy")
    fleet = (
        select(load_fleet(policy, any_host=args.all_providers), args.only)
        if policy
        else Fleet(specs=())
    )
    adhoc = tuple(adhoc_spec(argument, args.model) for argument in args.provider)
    specs = tuple(replace(spec, host=args.host) for spec in (*fleet.specs, *adhoc))
    names = [spec.name for spec in specs]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise FleetError(f"providers {duplicated} are defined twice")
    if not names:
        kind = "http" if args.all_providers else "loopback http"
        raise FleetError(f"nothing to simulate: no {kind} providers in {policy}")
    return Fleet(specs=specs, skipped=fleet.skipped)


async def serve(fleet: Fleet) -> None:
    """Start every provider, wait for SIGTERM/SIGINT, stop them all."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    for name, reason in fleet.skipped:
        log.info("not simulated", extra={"fields": {"provider": name, "reason": reason}})
    sims = [ProviderSim(spec) for spec in fleet.specs]
    started: list[ProviderSim] = []
    try:
        for sim in sims:
            try:
                await sim.start()
            except OSError as error:
                raise StartError(
                    f"cannot listen on {sim.spec.host}:{sim.spec.port} "
                    f"for {sim.spec.name}: {error.strerror or error}"
                ) from error
            started.append(sim)
        await stop.wait()
    finally:
        await asyncio.gather(*(sim.stop() for sim in started))


def main(argv: list[str] | None = None) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLineFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        fleet = plan(args)
    except FleetError as error:
        log.error("bad configuration", extra={"fields": {"error": str(error)}})
        return 2
    try:
        asyncio.run(serve(fleet))
    except StartError as error:
        log.error("cannot start", extra={"fields": {"error": str(error)}})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
