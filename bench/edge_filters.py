"""What the edge's accounting pieces cost Envoy per request, each alone on a plain Envoy.

The routed bench (routed_path.py) shows the edge spending more CPU per request with usage
accounting on than off. This prices the pieces accounting adds to the edge, in isolation and in
the same run: the same static Envoy in front of the same fast upstream, once plain, once with
the usage-capture Lua filter, once with the request-fields Lua filter (always on, for
comparison), once with the durable request log, each as the translator generates it. The four
Envoys run at once and are loaded in turn (wrk_load.interleaved), so the machine's drift weighs
on each alike. Prints Envoy's CPU microseconds per request at 16 connections over all rounds and
the difference from plain.

    python bench/edge_filters.py [--duration 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from google.protobuf import json_format
from rig import chat_body, cluster, fast_upstream, static_envoy
from wrk_load import Target, interleaved, wrk

from control_plane.translate.durable_log import durable_edge_log
from control_plane.translate.listeners import _request_fields, _usage_capture
from control_plane.translate.settings import EdgeSettings
from gpu_router.processes import ManagedProcess, free_port


def as_json(message: object) -> dict:
    """A generated proto as the dict a static bootstrap takes."""
    return json.loads(json_format.MessageToJson(message))


def variants(work: Path) -> dict[str, tuple[list[dict], list[dict]]]:
    """Name -> (HTTP filters before the router, access loggers)."""
    logs = [as_json(log) for log in durable_edge_log(EdgeSettings(edge_log_dir=str(work)))]
    for log in logs:
        log["typedConfig"]["path"] = str(work / "edge.jsonl")
    return {"plain": ([], []),
            "usage capture (Lua)": ([as_json(_usage_capture())], []),
            "request fields (Lua)": ([as_json(_request_fields())], []),
            "durable request log": ([], logs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of loading every variant in turn (forward, then reverse)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpu-router-edge-filters-"))
    upstream_port = free_port()
    upstream = fast_upstream(work, upstream_port)
    envoys: list[ManagedProcess] = []
    try:
        targets = []
        for index, (name, (filters, logs)) in enumerate(variants(work).items()):
            port = free_port()
            envoys.append(static_envoy(f"edge-{index}", work, port,
                                       {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}},
                                       [cluster("upstream", upstream_port)], filters=filters,
                                       access_log=logs))
            targets.append(Target(name, f"http://127.0.0.1:{port}/v1/chat/completions",
                                  {"envoy": envoys[-1].pid}))
            wrk(targets[-1].url, chat_body(64), 16, 1, work)  # warm up
        result = interleaved(targets, chat_body(64), 16, args.duration, work, args.rounds)
    finally:
        for process in (*envoys, upstream):
            process.stop()
    plain = result.cpu_us["plain"]["envoy"]
    for name, spent in result.cpu_us.items():
        rps = result.rps[name]
        print(f"{name:<22} {spent['envoy']:6.0f} us/request  {spent['envoy'] - plain:+5.0f} us  "
              f"({sum(rps) / len(rps):,.0f} req/s)")


if __name__ == "__main__":
    main()
