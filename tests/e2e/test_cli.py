"""The `gpu-router` command as a user runs it: validate, and up until Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.parse
from pathlib import Path

import yaml
from polling import eventually
from stack_harness import CLI, policy_on_free_ports

from control_plane.policy.load import default_policy_path
from gpu_router.processes import free_port, http_get, port_open


def test_validate_accepts_the_default_and_the_example() -> None:
    result = subprocess.run([*CLI, "validate", str(default_policy_path()), "examples/policy.yaml"],
                            capture_output=True, text=True, cwd=Path(__file__).parents[2], check=False)

    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok (") == 2


def test_validate_names_file_line_and_key_of_every_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = default_policy_path().read_text()
    bad.write_text(text.replace("price: {input: 0.05, output: 0.08}", "price: {input: -1, output: 0.08}")
                   .replace("max_concurrency: 32", "max_concurrency: lots"))

    result = subprocess.run([*CLI, "validate", str(bad)], capture_output=True, text=True, check=False)

    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert any(line.startswith(f"{bad}:") and "providers[2].max_concurrency" in line for line in lines)
    assert any("providers[2].models[0].price.input" in line for line in lines)


def test_up_runs_the_stack_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    policy = policy_on_free_ports(default_policy_path(), tmp_path / "policy.yaml")
    ports = {name: free_port() for name in ("edge", "admin", "xds", "ext-proc", "http")}
    argv = [*CLI, "up", "--policy", str(policy), "--log-dir", str(tmp_path / "logs"),
            *(arg for name, port in ports.items() for arg in (f"--{name}-port", str(port)))]
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}  # the ledger's default home
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        output = []
        for line in up.stdout:
            output.append(line)
            if "Ctrl-C" in line:
                break
        assert f"http://127.0.0.1:{ports['edge']}/v1" in "".join(output), "".join(output)

        status, body = http_get(f"http://127.0.0.1:{ports['edge']}/v1/models")
        assert status == 200 and json.loads(body)["data"]

        up.send_signal(signal.SIGINT)
        eventually(lambda: not port_open(ports["edge"]), "the edge to stop")
        up.send_signal(signal.SIGINT)  # an impatient second Ctrl-C must not orphan children
        assert up.wait(timeout=30) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert not any(port_open(port) for port in ports.values())
    sims = [urllib.parse.urlsplit(p["base_url"]).port for p in yaml.safe_load(policy.read_text())["providers"]]
    assert not any(port_open(port) for port in sims)


def test_up_rejects_a_bad_policy_before_starting_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nproviders: []\n")

    result = subprocess.run([*CLI, "up", "--policy", str(bad)], capture_output=True, text=True,
                            timeout=60, check=False)

    assert result.returncode == 2
    assert str(bad) in result.stderr


def test_up_rejects_an_unusable_edge_certificate_before_starting_anything(tmp_path: Path) -> None:
    """A missing file, or one flag without the other: a clear error and exit 2, and no log
    directory is ever made (nothing started)."""
    missing = tmp_path / "missing.pem"
    log_dir = tmp_path / "logs"
    for flags, says in (
        (["--edge-tls-cert", str(missing), "--edge-tls-key", str(missing)],
         f"{missing}: cannot read"),
        (["--edge-tls-cert", str(missing)], "--edge-tls-cert and --edge-tls-key go together"),
    ):
        result = subprocess.run([*CLI, "up", "--log-dir", str(log_dir), *flags],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2 and says in result.stderr, result.stderr
        assert not log_dir.exists()
