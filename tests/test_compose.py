"""docker-compose.yml: it parses as a Compose file, and every address and port in it agrees with
the control plane's flags, the Envoy bootstrap, the default policy and the simulator.

No Docker engine runs here: Debian's docker-compose renders the file, the rest is read with
the same parsers the services use (control_plane's and simulator's argument parsers), and the
two pieces that are not ours (the Envoy image's healthcheck, the Compose bootstrap) run against
the real Envoy.
"""

from __future__ import annotations

import copy
import http.client
import os
import re
import shutil
import signal
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_file import COMPOSE_FILE, ROOT, compose_services, flags, host_path, of_kind, program
from xds_fixtures import AdsHarness

from control_plane.options import Options
from control_plane.options import parse_args as control_plane_args
from control_plane.policy.load import default_policy_path
from control_plane.xds import type_urls
from gpu_router import pki
from gpu_router.bootstrap import (
    BOOTSTRAP_TEMPLATE,
    DEFAULT_EDGE_TLS,
    DEFAULT_SECRETS,
    XDS_CLUSTER,
    EdgeNode,
    render_bootstrap,
    secret_files,
)
from gpu_router.processes import (
    EnvoyAdmin,
    ManagedProcess,
    envoy_binary,
    free_port,
    http_get,
    port_open,
    python_module,
)
from simulator.__main__ import parse_args as simulator_args
from simulator.__main__ import plan as simulator_plan

DRAIN_SCRIPT = ROOT / "deploy/compose/envoy-drain.sh"
EDGE_NODE_CLUSTER = "gpu-router-edge"


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return compose_services()


def published(service: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """container port -> (host address, host port) of a service's short-syntax `ports`."""
    out: dict[int, tuple[str, int]] = {}
    for entry in service.get("ports", []):
        *address, host_port, container_port = entry.split(":")
        out[int(container_port)] = (address[0] if address else "0.0.0.0", int(host_port))
    return out


def control_plane_options(services: dict[str, dict[str, Any]]) -> Options:
    [service] = of_kind(services, "control_plane").values()
    return control_plane_args(service["command"][3:])


def simulated_policy(services: dict[str, dict[str, Any]]) -> Path:
    [service] = of_kind(services, "simulator").values()
    return host_path(service, flags(service["command"])["--policy"][0])


def test_docker_compose_renders_the_file() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's package)")
    result = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "config"],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)["services"]
    assert set(rendered) == set(compose_services())
    assert rendered["envoy-1"]["depends_on"]["control-plane"]["condition"] == "service_healthy"
    for name, service in rendered.items():
        assert (service["init"], service["stop_signal"]) == (True, "SIGTERM"), name
        assert seconds(service["stop_grace_period"]) > 0, name
    assert rendered["envoy-1"]["entrypoint"] == ["bash", "/etc/envoy/envoy-drain.sh"]


def test_the_fleet_has_a_control_plane_two_envoys_two_ext_procs_and_the_simulator(
    services: dict[str, dict[str, Any]],
) -> None:
    assert len(of_kind(services, "control_plane")) == 1
    assert len(of_kind(services, "simulator")) == 1
    assert len(of_kind(services, "ext_proc")) >= 2
    envoys = of_kind(services, "envoy")
    assert len(envoys) >= 2
    assert all(s["image"].startswith("envoyproxy/envoy:v1.40") for s in envoys.values())
    kinds = {program(s["command"]) for s in services.values()}
    assert kinds == {"control_plane", "simulator", "ext_proc", "envoy", "redis-server"}


def test_every_ext_proc_replica_counts_rate_limits_in_the_fleets_redis(
    services: dict[str, dict[str, Any]],
) -> None:
    [redis] = [name for name, s in services.items() if program(s["command"]) == "redis-server"]
    for name, service in of_kind(services, "ext_proc").items():
        # TLS, the replica's own certificate presented and Redis's checked for this host name
        assert flags(service["command"])["--redis"] == [f"rediss://{redis}:6379"], name
        assert service["depends_on"][redis] == {"condition": "service_healthy"}, name
    assert "ports" not in services[redis]  # the fleet's own: not published
    # The control plane deletes a revoked replica's user there (it starts first: Redis waits
    # for it, and it looks again every second).
    [control] = of_kind(services, "control_plane").values()
    assert flags(control["command"])["--redis"] == [f"rediss://{redis}:6379"]


def seconds(duration: str) -> float:
    """A Compose duration of seconds ("10s") as a number."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s", duration)
    assert match, f"{duration!r} is not a duration in seconds"
    return float(match[1])


def test_every_service_restarts_and_has_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
        assert service["healthcheck"]["test"][0] == "CMD", name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"


def test_every_service_stops_on_sigterm_under_an_init_that_passes_it_on(
    services: dict[str, dict[str, Any]],
) -> None:
    """Each process handles SIGTERM (the Python services within a 2 s gRPC grace); the init
    makes the install step and Envoy's drain script stoppable, and reaps what they leave."""
    for name, service in services.items():
        assert service["init"] is True, name
        assert service["stop_signal"] == "SIGTERM", name
        assert seconds(service["stop_grace_period"]) >= 10, name


def test_envoy_drains_before_it_stops_within_the_grace_period(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in of_kind(services, "envoy").items():
        [interpreter, script] = service["entrypoint"]
        assert interpreter == "bash" and host_path(service, script) == DRAIN_SCRIPT, name
        argv = flags(service["command"])
        assert argv["--drain-strategy"] == ["immediate"], "every connection told to close at once"
        [drain_s] = argv["--drain-time-s"]
        assert seconds(service["stop_grace_period"]) >= int(drain_s) + 5, name


def test_the_control_plane_listens_on_every_interface_and_publishes_its_http_port(
    services: dict[str, dict[str, Any]],
) -> None:
    options = control_plane_options(services)
    [service] = of_kind(services, "control_plane").values()
    assert (options.xds_host, options.http_host, options.edge_host) == ("0.0.0.0",) * 3
    assert published(service) == {options.http_port: ("127.0.0.1", 8080)}
    assert f"127.0.0.1:{options.http_port}/healthz" in service["healthcheck"]["test"][-1]
    assert options.policy is not None
    assert host_path(service, str(options.policy)) == simulated_policy(services)


def test_envoy_nodes_bootstrap_to_the_control_plane_service(
    services: dict[str, dict[str, Any]],
) -> None:
    options = control_plane_options(services)
    [control_plane_name] = of_kind(services, "control_plane")
    node_ids = []
    for name, service in of_kind(services, "envoy").items():
        argv = flags(service["command"])
        bootstrap = host_path(service, argv["-c"][0])
        expected = render_bootstrap(EdgeNode(xds_host=control_plane_name, xds_port=options.xds_port,
                                             secrets_dir=DEFAULT_SECRETS))
        assert yaml.safe_load(bootstrap.read_text()) == expected, name
        # The SDS files it names, mounted from the repository, name the node's certs volume.
        for path, content in secret_files(DEFAULT_EDGE_TLS, DEFAULT_SECRETS).items():
            assert yaml.safe_load(host_path(service, str(path)).read_text()) == content, name
        assert argv["--service-cluster"] == [EDGE_NODE_CLUSTER]
        node_ids += argv["--service-node"]
    assert len(set(node_ids)) == len(node_ids) == len(of_kind(services, "envoy"))


def test_edge_ports_are_published_once_per_node_and_admin_stays_in_the_container(
    services: dict[str, dict[str, Any]],
) -> None:
    """Admin binds the container's loopback: not reachable from the compose network, and a
    published port could not reach it either; the healthcheck runs inside the container."""
    options = control_plane_options(services)
    envoys = of_kind(services, "envoy")
    admin = render_bootstrap(EdgeNode())["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1"
    edge_hosts = []
    for name, service in envoys.items():
        ports = published(service)
        assert set(ports) == {options.edge_port}, name
        assert f"/dev/tcp/127.0.0.1/{admin['port_value']} " in service["healthcheck"]["test"][-1]
        edge_hosts.append(ports[options.edge_port][1])
    assert sorted(edge_hosts) == [10000 + i for i in range(len(envoys))]


def test_the_control_plane_names_every_ext_proc_replica_where_it_listens(
    services: dict[str, dict[str, Any]],
) -> None:
    options = control_plane_options(services)
    [control_plane_name] = of_kind(services, "control_plane")
    replicas = {}
    for name, service in of_kind(services, "ext_proc").items():
        argv = flags(service["command"])
        host, _, port = argv["--listen"][0].rpartition(":")
        assert host == "0.0.0.0", name
        assert argv["--xds"] == [f"{control_plane_name}:{options.xds_port}"]
        check = service["healthcheck"]["test"]
        assert check[3:5] == ["ext_proc.healthcheck", f"127.0.0.1:{port}"], name
        # The port takes mutual TLS only: the check presents the replica's own certificate.
        assert flags(check[5:]) == {f: argv[f] for f in ("--tls-ca", "--tls-cert", "--tls-key")}
        replicas[name] = int(port)
    assert sorted(options.ext_proc_endpoints) == sorted(replicas.items())


def test_the_compose_policy_is_the_default_policy_on_the_simulator_service(
    services: dict[str, dict[str, Any]],
) -> None:
    compose_policy = yaml.safe_load(simulated_policy(services).read_text())
    default = yaml.safe_load(default_policy_path().read_text())
    [simulator_name] = of_kind(services, "simulator")
    moved = copy.deepcopy(default)
    for provider in moved["providers"]:
        url = urllib.parse.urlsplit(provider["base_url"])
        provider["base_url"] = url._replace(netloc=f"{simulator_name}:{url.port}").geturl()
    assert compose_policy == moved


def test_the_simulator_serves_every_provider_of_the_compose_policy(
    services: dict[str, dict[str, Any]],
) -> None:
    [service] = of_kind(services, "simulator").values()
    command = [
        str(host_path(service, word)) if word.startswith("/src/") else word
        for word in service["command"][3:]
    ]
    fleet = simulator_plan(simulator_args(command))
    policy = yaml.safe_load(simulated_policy(services).read_text())
    wanted = {p["name"]: urllib.parse.urlsplit(p["base_url"]).port for p in policy["providers"]}
    assert {spec.name: spec.port for spec in fleet.specs} == wanted
    assert {spec.host for spec in fleet.specs} == {"0.0.0.0"}
    assert fleet.skipped == ()
    health = service["healthcheck"]["test"][-1]
    assert f"for p in {tuple(sorted(wanted.values()))}" in health


def test_all_providers_are_served_on_the_given_host(tmp_path: Path) -> None:
    """--all-providers --host, run for real: providers named by a non-loopback host answer."""
    document = yaml.safe_load((ROOT / "deploy/compose/policy.yaml").read_text())
    ports = {}
    for provider in document["providers"]:
        ports[provider["name"]] = free_port()
        provider["base_url"] = f"http://simulator:{ports[provider['name']]}"
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(document))
    args = ["--all-providers", "--host", "127.0.0.1", "--policy", str(policy)]
    sims = python_module("simulator", "simulator", args, tmp_path).start()
    try:
        health = {p["name"]: p.get("health_check_path", "/health") for p in document["providers"]}
        for name, port in ports.items():
            url = f"http://127.0.0.1:{port}{health[name]}"
            sims.wait_until(lambda url=url: http_get(url)[0] == 200, f"{name} to answer {url}")
    finally:
        sims.stop()


def test_the_compose_bootstrap_passes_envoy_validation(tmp_path: Path) -> None:
    """Validated as it is, except that its SDS files' directory and the certificate paths they
    name (the node's certs volume) point at files here: Envoy checks that they exist."""
    secrets = tmp_path / "secrets"
    text = (ROOT / "deploy/compose/envoy.yaml").read_text()
    assert str(DEFAULT_SECRETS) in text
    edge = pki.ensure(tmp_path / "certs", [pki.Identity(pki.Role.EDGE, "edge")])["edge"]
    secrets.mkdir()
    for path, content in secret_files(edge, secrets).items():
        path.write_text(yaml.safe_dump(content))
    config = tmp_path / "envoy.yaml"
    config.write_text(text.replace(str(DEFAULT_SECRETS), str(secrets)))
    result = subprocess.run(
        [
            envoy_binary(),
            "--mode",
            "validate",
            "-c",
            str(config),
            "--service-node",
            "envoy-1",
            "--service-cluster",
            EDGE_NODE_CLUSTER,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_bootstrap_reaches_the_control_plane_as_gpu_router_up_does() -> None:
    """Its xDS connection's HTTP/2 options (keepalive, and the connection age that lets a replaced
    certificate leave it: edge_secret_files.CONNECTION_MAX_AGE_S) are the bootstrap's, which
    test_bootstrap.py checks against the constant."""

    def options(path: Path) -> dict:
        clusters = yaml.safe_load(path.read_text())["static_resources"]["clusters"]
        (xds,) = [cluster for cluster in clusters if cluster["name"] == XDS_CLUSTER]
        return xds["typed_extension_protocol_options"]

    assert options(ROOT / "deploy/compose/envoy.yaml") == options(BOOTSTRAP_TEMPLATE)


@pytest.fixture
def ads() -> Iterator[AdsHarness]:
    harness = AdsHarness().start()
    try:
        yield harness
    finally:
        harness.stop()


def test_the_envoy_healthcheck_passes_only_once_envoy_is_live(
    services: dict[str, dict[str, Any]], ads: AdsHarness, tmp_path: Path
) -> None:
    """The image has no curl: the healthcheck speaks HTTP over bash's /dev/tcp. Run it."""
    [service, *_] = of_kind(services, "envoy").values()
    admin = EnvoyAdmin(free_port())
    node = EdgeNode(admin_port=admin.port, xds_port=ads.port, tls=None)  # plaintext AdsHarness
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(render_bootstrap(node)))
    healthcheck = [
        word.replace("/dev/tcp/127.0.0.1/9901", f"/dev/tcp/127.0.0.1/{admin.port}")
        for word in service["healthcheck"]["test"][1:]
    ]

    def healthy() -> bool:
        return (
            subprocess.run(healthcheck, check=False, capture_output=True, timeout=10).returncode
            == 0
        )

    assert not healthy(), "nothing listens yet"
    envoy = ManagedProcess(
        "envoy", [envoy_binary(), "-c", str(config), "--disable-hot-restart"], tmp_path / "e.log"
    ).start()
    try:
        envoy.wait_until(lambda: admin.stats("server.state") != {}, "the admin port")
        assert not healthy(), "Envoy waits for its first CDS and LDS"
        ads.call(lambda: ads.cache.set_types({type_urls.CLUSTER: {}, type_urls.LISTENER: {}}))
        envoy.wait_until(healthy, "the healthcheck to pass")
    finally:
        envoy.stop()


def direct_response_bootstrap(admin_port: int, edge_port: int) -> dict[str, Any]:
    """An Envoy with one listener that answers 200 by itself: something to drain."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
                 ".v3.HttpConnectionManager",
        "stat_prefix": "edge",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    listener = {
        "name": "edge",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": edge_port}},
        "filter_chains": [{"filters": [
            {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [listener]},
    }


def told_to_close(port: int) -> bool:
    """One keep-alive GET (urllib would ask to close itself): did Envoy answer 200 with
    `connection: close`, as it does to every request while it drains (strategy immediate)?"""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/")
        answer = connection.getresponse()
        answer.read()
        assert answer.status == 200
        return answer.getheader("connection") == "close"
    finally:
        connection.close()


def test_the_envoy_entrypoint_drains_on_sigterm_then_stops_envoy(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The Compose entrypoint run for real around the real Envoy: after SIGTERM, Envoy still
    answers, each answer asking the client to close its connection, then exits cleanly."""
    [service, *_] = of_kind(services, "envoy").values()
    admin, edge_port = EnvoyAdmin(free_port()), free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(direct_response_bootstrap(admin.port, edge_port)))
    drain = flags(service["command"])
    argv = ["bash", str(DRAIN_SCRIPT), envoy_binary(), "-c", str(config), "--disable-hot-restart",
            "--drain-time-s", *drain["--drain-time-s"],
            "--drain-strategy", *drain["--drain-strategy"]]
    entrypoint = ManagedProcess("envoy", argv, tmp_path / "envoy.log",
                                env={"ENVOY_ADMIN_PORT": str(admin.port)}).start()
    try:
        entrypoint.wait_until(admin.ready, "Envoy to be live")
        assert not told_to_close(edge_port)

        os.kill(entrypoint.pid, signal.SIGTERM)  # docker stop, passed on by the init
        entrypoint.wait_until(lambda: told_to_close(edge_port), "Envoy to drain, still serving")
        os.kill(entrypoint.pid, signal.SIGTERM)  # a second docker stop changes nothing
        assert told_to_close(edge_port)
        assert entrypoint.popen is not None and entrypoint.popen.wait(timeout=30) == 0
        assert not port_open(admin.port) and not port_open(edge_port)
    finally:
        entrypoint.stop()
