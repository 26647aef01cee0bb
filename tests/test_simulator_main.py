"""`python -m simulator` as a process: starts the fleet asked for, stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import yaml

from gpu_router.processes import ManagedProcess, free_port, http_get, python_module


def write_policy(path: Path, ports: dict[str, int]) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "providers": [
                    {
                        "name": name,
                        "base_url": f"http://127.0.0.1:{port}",
                        "health_check_path": "/hc",
                        "models": [{"name": "pub", "id": f"{name}-model"}],
                    }
                    for name, port in ports.items()
                ]
                + [
                    {
                        "name": "remote",
                        "base_url": "https://api.example.com",
                        "models": [{"name": "pub"}],
                    }
                ],
            }
        )
    )
    return path


def log_lines(process: ManagedProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in process.log_path.read_text().splitlines() if line]


def healthy(port: int) -> bool:
    return http_get(f"http://127.0.0.1:{port}/hc")[0] == 200


def test_policy_fleet_with_only_and_adhoc_provider(tmp_path: Path) -> None:
    ports = {"one": free_port(), "two": free_port()}
    adhoc_port = free_port()
    policy = write_policy(tmp_path / "policy.yaml", ports)
    process = python_module(
        "sim",
        "simulator",
        [
            "--policy",
            str(policy),
            "--only",
            "two",
            "--provider",
            f"extra={adhoc_port}",
            "--model",
            "x",
            "--model",
            "y",
        ],
        tmp_path,
    ).start()
    try:
        process.wait_until(lambda: healthy(ports["two"]), "provider two healthy")
        process.wait_until(
            lambda: http_get(f"http://127.0.0.1:{adhoc_port}/health")[0] == 200,
            "ad hoc provider healthy",
        )
        _, body = http_get(f"http://127.0.0.1:{adhoc_port}/v1/models")
        assert [m["id"] for m in json.loads(body)["data"]] == ["x", "y"]
        assert (
            json.loads(http_get(f"http://127.0.0.1:{ports['two']}/_sim/stats")[1])["provider"]
            == "two"
        )
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", ports["one"])) != 0
    finally:
        process.stop()
    assert process.popen is not None and process.popen.returncode == 0
    lines = log_lines(process)
    assert {line["msg"] for line in lines} >= {"listening", "not simulated", "stopped"}
    assert sorted(line["provider"] for line in lines if line["msg"] == "stopped") == [
        "extra",
        "two",
    ]


def test_bad_command_line_exits_2_with_a_json_error(tmp_path: Path) -> None:
    process = python_module("sim-bad", "simulator", ["--only", "nope"], tmp_path).start()
    try:
        assert process.popen is not None and process.popen.wait(timeout=30) == 2
    finally:
        process.stop()
    error = log_lines(process)[-1]
    assert error["level"] == "ERROR" and "nope" in str(error["error"])


def test_taken_port_exits_1(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        process = python_module(
            "sim-taken", "simulator", ["--provider", f"p={port}", "--model", "m"], tmp_path
        ).start()
        try:
            assert process.popen is not None and process.popen.wait(timeout=30) == 1
        finally:
            process.stop()
    assert f"127.0.0.1:{port}" in str(log_lines(process)[-1]["error"])
