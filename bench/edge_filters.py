"""What the edge's accounting pieces cost Envoy per request, each alone on a plain Envoy.

The routed bench (routed_path.py) shows the edge spending more CPU per request with usage
accounting on than off. This prices the pieces accounting adds to the edge, in isolation and in
the same run: the same static Envoy in front of the same fast upstream, once plain, once with
the usage-capture Lua filter, once with the request-fields Lua filter (always on, for
comparison), once with the durable request log, each as the translator generates it. A plain
Envoy has no dynamic metadata for the durable log to render, and in the stack that is most of
its cost, so two more Envoys carry a routed request's metadata (set by a Lua filter as ext_proc
and the edge's filters set it, ROUTED_METADATA): one without the log and one with it. The
Envoys run at once and are loaded in turn (wrk_load.interleaved), so the machine's drift weighs
on each alike. Prints Envoy's CPU microseconds per request at 16 connections over all rounds,
the difference from plain, and the durable log's over the routed metadata alone.

    python bench/edge_filters.py [--duration 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from google.protobuf import json_format
from rig import COMPLETION, MODEL, chat_body, cluster, fast_upstream, static_envoy
from wrk_load import Target, interleaved, wrk

from control_plane.translate.durable_log import durable_edge_log
from control_plane.translate.listeners import _request_fields, _usage_capture
from control_plane.translate.names import (
    METADATA_NAMESPACE,
    REQUEST_METADATA_NAMESPACE,
    USAGE_METADATA_NAMESPACE,
    USAGE_METADATA_TEXT_KEY,
)
from control_plane.translate.settings import EdgeSettings
from control_plane.translate.upstream_lua import lua_string
from ext_proc.request import _decision_fields

ROUTED_METADATA = {
    METADATA_NAMESPACE: {
        **json_format.MessageToDict(_decision_fields(
            "fast-1", ("fast-2", "fast-3"), MODEL, "interactive", "balanced")),
        "reason": "balanced: best score 0.41 of 4 eligible",
        "candidates": "fast-1=0.410 fast-2=0.433 fast-3=0.502 fast-0=0.611",
        "path": "/v1/chat/completions", "length": "153"},
    REQUEST_METADATA_NAMESPACE: {"model": MODEL, "max_tokens": 16, "stream": False},
}
"""What a routed request's metadata holds by its end, but the usage: ext_proc's decision (as it
builds it, and the provider's upstream Lua's path and length), the request-fields filter's body
fields."""
USAGE_TEXT = COMPLETION[COMPLETION.rindex('"usage"'):]
"""What the usage capture keeps of the fast upstream's answer: from its last "usage" key on."""


def _lua_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "{" + ", ".join(_lua_value(item) for item in value) + "}"
    if isinstance(value, dict):
        members = (f"[{lua_string(key)}] = {_lua_value(item)}" for key, item in value.items())
        return "{" + ", ".join(members) + "}"
    return lua_string(str(value))


def routed_metadata() -> dict:
    """A Lua filter that sets ROUTED_METADATA on each request, and the usage on its response."""
    sets = "\n".join(
        f"  metadata:set({lua_string(namespace)}, {lua_string(key)}, {_lua_value(value)})"
        for namespace, fields in ROUTED_METADATA.items() for key, value in fields.items())
    source = ("function envoy_on_request(handle)\n"
              "  local metadata = handle:streamInfo():dynamicMetadata()\n"
              f"{sets}\nend\n"
              "function envoy_on_response(handle)\n"
              "  handle:streamInfo():dynamicMetadata():set("
              f"{lua_string(USAGE_METADATA_NAMESPACE)}, {lua_string(USAGE_METADATA_TEXT_KEY)}, "
              f"{lua_string(USAGE_TEXT)})\nend\n")
    return {"name": "envoy.filters.http.lua", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": source}}}
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
            "durable request log": ([], logs),
            "routed metadata": ([routed_metadata()], []),
            "routed metadata, log": ([routed_metadata()], logs)}


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
    cpu = {name: spent["envoy"] for name, spent in result.cpu_us.items()}
    logged = cpu["routed metadata, log"] - cpu["routed metadata"]
    print(f"the durable log over a routed request's metadata: {logged:+.0f} us/request")


if __name__ == "__main__":
    main()
