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
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_client
import yaml
from cryptography import x509
from xds_fixtures import AdsHarness

from control_plane.options import Options
from control_plane.options import parse_args as control_plane_args
from control_plane.policy.load import default_policy_path
from control_plane.translate.names import EDGE_CERTIFICATE_SECRET, FLEET_CA_SECRET
from control_plane.xds import type_urls
from gpu_router import pki
from gpu_router.bootstrap import EdgeNode, edge_secrets, render_bootstrap, xds_transport_socket
from gpu_router.processes import (
    EnvoyAdmin,
    ManagedProcess,
    envoy_binary,
    free_port,
    http_get,
    port_open,
    python_module,
)
from gpu_router.redis_service import (
    CONTROL_USER,
    access_rules,
    password_file,
    read_password,
    replica_passwords,
    replica_users,
)
from simulator.__main__ import parse_args as simulator_args
from simulator.__main__ import plan as simulator_plan

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DRAIN_SCRIPT = ROOT / "deploy/compose/envoy-drain.sh"
EDGE_NODE_CLUSTER = "gpu-router-edge"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def of_kind(services: dict[str, dict[str, Any]], module: str) -> dict[str, dict[str, Any]]:
    """Services whose command runs `python -m module` (or `envoy` for module "envoy")."""
    return {name: s for name, s in services.items() if _program(s["command"]) == module}


def _program(command: list[str]) -> str:
    return command[2] if command[:2] == ["python", "-m"] else command[0]


def flags(command: list[str]) -> dict[str, list[str]]:
    """-flag value pairs of an argv, values of repeated flags in order (switches map to [])."""
    out: dict[str, list[str]] = {}
    for index, word in enumerate(command):
        if word.startswith("-"):
            value = command[index + 1 : index + 2]
            out.setdefault(word, []).extend(v for v in value if not v.startswith("-"))
    return out


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """The repository file a service sees at `container_path` through its bind mounts."""
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return (ROOT / source / container_path[len(target) :].lstrip("/")).resolve()
    raise AssertionError(f"{container_path} is not mounted into the service")


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
    assert set(rendered) == set(yaml.safe_load(COMPOSE_FILE.read_text())["services"])
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
    kinds = {_program(s["command"]) for s in services.values()}
    assert kinds == {"control_plane", "simulator", "ext_proc", "envoy", "redis-server"}


def test_every_ext_proc_replica_counts_rate_limits_in_the_fleets_redis(
    services: dict[str, dict[str, Any]],
) -> None:
    [redis] = [name for name, s in services.items() if _program(s["command"]) == "redis-server"]
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
        expected = render_bootstrap(EdgeNode(xds_host=control_plane_name, xds_port=options.xds_port))
        assert yaml.safe_load(bootstrap.read_text()) == expected, name
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
    """Validated as it is, except that its certificate paths (the node's certs volume) point at
    files here: Envoy checks that they exist."""
    bootstrap = yaml.safe_load((ROOT / "deploy/compose/envoy.yaml").read_text())
    [xds] = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "gpu-router.xds"]
    edge = pki.ensure(tmp_path / "certs", [pki.Identity(pki.Role.EDGE, "edge")])["edge"]
    xds["transport_socket"] = xds_transport_socket(edge, xds["transport_socket"])
    assert [secret["name"] for secret in bootstrap["static_resources"]["secrets"]] == [
        secret["name"] for secret in edge_secrets(edge)]
    bootstrap["static_resources"]["secrets"] = edge_secrets(edge)
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(bootstrap))
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


def in_volume(service: dict[str, Any], container_path: str, volumes: dict[str, Path]) -> Path:
    """Where `container_path` of a service lies, given each named volume's directory here."""
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        inside = container_path == target or container_path.startswith(target.rstrip("/") + "/")
        if source in volumes and inside:
            return volumes[source] / container_path[len(target) :].lstrip("/")
    raise AssertionError(f"{container_path} is in no named volume of the service")


def redis_healthcheck_passes_only_with_the_password(
    redis: dict[str, Any], volumes: dict[str, Path], tmp_path: Path,
    replicas: dict[str, dict[str, Any]], control: dict[str, Any],
) -> None:
    """The Redis service's healthcheck, run against a redis-server on its config as the control
    plane's entrypoint made it (moved to a free port, its TLS files to where the volume lies
    here): it passes over TLS, and fails once the password file it reads holds another
    password; each replica, on the files its command names, counts there and may do nothing
    else; the control plane, on its own, may delete a replica's user and not read a counter."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it on Debian); every "
                    "other check of this test ran")
    port = free_port()
    config = in_volume(redis, redis["command"][1], volumes)
    password_file = in_volume(redis, "/redis/redis-password", volumes)
    tls_dir = in_volume(redis, "/redis-tls", volumes)
    # The TLS files the config names, each where its volume lies here (a wrong path in the
    # config names no file here, and redis-server does not start).
    named = [line.split() for line in config.read_text().splitlines()
             if line.startswith("tls-") and line.split()[0].endswith("-file")]
    moved = [word for key, path in named for word in (f"--{key}", str(in_volume(redis, path,
                                                                                  volumes)))]
    assert {key for key, _ in named} == {"tls-cert-file", "tls-key-file", "tls-ca-cert-file"}
    server = ManagedProcess("redis", ["redis-server", str(config), "--tls-port", str(port),
                                      *moved, "--bind", "127.0.0.1", "--dir", str(tmp_path)],
                            tmp_path / "redis.log").start()
    try:
        server.wait_until(lambda: port_open(port), "redis-server to listen")
        [shell, flag, script] = redis["healthcheck"]["test"][1:]
        script = script.replace("$$", "$").replace("/redis/redis-password", str(password_file))
        script = script.replace("/redis-tls/", f"{tls_dir}/")
        script = script.replace("redis-cli ", f"redis-cli -p {port} ")

        def healthy() -> bool:
            return subprocess.run([shell, flag, script], check=False, timeout=10).returncode == 0

        assert healthy()
        for name, service in replicas.items():
            assert replica_may_count_only(service, volumes, port), name
        assert control_plane_deletes_a_replica(control, volumes, port, next(iter(replicas)))
        password_file.write_text("another-password-of-the-right-form\n")
        assert not healthy()
    finally:
        server.stop()


def replica_may_count_only(service: dict[str, Any], volumes: dict[str, Path], port: int) -> bool:
    """The replica, with the TLS files and password its command names and the Redis user its
    certificate names, moves a counter; CONFIG is refused it."""
    argv = flags(service["command"])
    ca, cert, key, password = (in_volume(service, argv[flag][0], volumes) for flag in (
        "--tls-ca", "--tls-cert", "--tls-key", "--redis-password-file"))
    _, user = role_of_file(cert) or (None, "")
    client = redis_client.Redis(
        host="127.0.0.1", port=port, username=user, password=read_password(password),
        ssl=True, ssl_ca_certs=str(ca), ssl_certfile=str(cert), ssl_keyfile=str(key),
        ssl_check_hostname=False, socket_timeout=5)  # Redis's name is "redis", dialled here by IP
    try:
        client.incrby("gpu-router:rl:compose:1", 1)
        try:
            client.config_get("dir")
        except redis_client.exceptions.NoPermissionError:
            return True
        return False
    finally:
        client.close()


def control_plane_deletes_a_replica(control: dict[str, Any], volumes: dict[str, Path],
                                    port: int, replica: str) -> bool:
    """The control plane, with the password file its command names and its own certificate
    (in --certs-dir), finds in Redis the replica users its certs directory keeps passwords for
    (it would delete any other), deletes `replica`'s, and is refused reading a counter."""
    argv = flags(control["command"])
    certs = in_volume(control, argv["--certs-dir"][0], volumes)
    password = in_volume(control, argv["--redis-password-file"][0], volumes)
    client = redis_client.Redis(
        host="127.0.0.1", port=port, username=CONTROL_USER, password=read_password(password),
        ssl=True, ssl_ca_certs=str(certs / "ca.pem"), ssl_certfile=str(certs / "control-plane.pem"),
        ssl_keyfile=str(certs / "control-plane-key.pem"), ssl_check_hostname=False,
        socket_timeout=5)
    try:
        assert replica_users(client.acl_users()) == sorted(replica_passwords(certs))
        deleted = client.acl_deluser(replica) == 1
        try:
            client.get("gpu-router:rl:compose:1")
        except redis_client.exceptions.NoPermissionError:
            return deleted
        return False
    finally:
        client.close()


def role_of_file(path: Path) -> tuple[pki.Role, str] | None:
    [uri] = pki.uri_sans(x509.load_pem_x509_certificate(path.read_bytes()))
    return pki.role_of(uri)


def test_each_node_presents_its_roles_certificate_which_the_control_plane_makes(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The control plane's entrypoint script, run for real into three directories standing in
    for the volumes: every path the services name is there, with the right role, and each
    role's volume holds that role's key only (the CA key stays in the control plane's)."""
    [control] = of_kind(services, "control_plane").values()
    [*_, shell, script] = control["entrypoint"]
    nodes = {name: flags(service["command"])["--service-node"][0]
             for name, service in of_kind(services, "envoy").items()}
    replicas = list(of_kind(services, "ext_proc"))
    volumes = {name: tmp_path / name for name in (
        "pki", "redis-secret", "redis-tls", *(f"{node}-certs" for node in nodes.values()),
        *(f"{replica}-certs" for replica in replicas))}
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PKI_DIR": str(in_volume(control, "/pki", volumes)),
        "EDGE_ROOT": str(tmp_path),  # holding <node>-certs, as the control plane mounts them
        "EXT_PROC_ROOT": str(tmp_path),  # holding <replica>-certs, likewise
        "REDIS_DIR": str(in_volume(control, "/redis-secret", volumes)),
        "REDIS_TLS_DIR": str(in_volume(control, "/redis-tls", volumes)),
    }
    made = subprocess.run([shell, str(host_path(control, script)), "true"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    [certs_dir] = flags(control["command"])["--certs-dir"]
    assert role_of_file(in_volume(control, certs_dir, volumes) / "control-plane.pem") == (
        pki.Role.CONTROL_PLANE, "control-plane")

    passwords, dialled = set(), set()
    for name, service in of_kind(services, "ext_proc").items():
        argv = flags(service["command"])
        files = [in_volume(service, argv[flag][0], volumes)
                 for flag in ("--tls-ca", "--tls-cert", "--tls-key")]
        assert all(path.is_file() for path in files), name
        assert role_of_file(files[1]) == (pki.Role.EXT_PROC, name), "its own, naming it"
        assert files[1].parent == volumes[f"{name}-certs"], "in a volume of its own"
        # Its own Redis user's password, the user named by its certificate (ext_proc's default).
        [password] = argv["--redis-password-file"]
        assert in_volume(service, password, volumes).parent == volumes[f"{name}-certs"], name
        assert "--redis-user" not in argv, name
        mine = read_password(in_volume(service, password, volumes))
        assert mine == read_password(password_file(volumes["pki"], name)), name
        passwords.add(mine)
        dialled.update(urllib.parse.urlsplit(url).hostname for url in argv["--redis"])
    # Redis has a user per replica, with the password the replica reads and the pki keeps.
    [redis] = [s for s in services.values() if _program(s["command"]) == "redis-server"]
    config = in_volume(redis, redis["command"][1], volumes).read_text().splitlines()
    assert len(passwords) == len(replicas), "no replica's password is another's"
    rules = access_rules(volumes["pki"], replicas).splitlines()
    assert set(rules) <= set(config) and 'save ""' in config
    assert {"port 0", "tls-port 6379", "tls-auth-clients yes"} <= set(config)  # TLS only
    [served_path] = [line.split()[1] for line in config if line.startswith("tls-cert-file ")]
    served = x509.load_pem_x509_certificate(in_volume(redis, served_path, volumes).read_bytes())
    names = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    [host] = dialled
    assert host in names.get_values_for_type(x509.DNSName)  # the host the replicas dial
    for name, service in of_kind(services, "envoy").items():
        bootstrap = yaml.safe_load(host_path(service, flags(service["command"])["-c"][0]).read_text())
        [xds] = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "gpu-router.xds"]
        context = xds["transport_socket"]["typed_config"]["common_tls_context"]
        [pair] = context["tls_certificates"]
        cert = in_volume(service, pair["certificate_chain"]["filename"], volumes)
        key = in_volume(service, pair["private_key"]["filename"], volumes)
        ca = in_volume(service, context["validation_context"]["trusted_ca"]["filename"], volumes)
        assert cert.is_file() and key.is_file() and ca.is_file(), name
        assert role_of_file(cert) == (pki.Role.EDGE, nodes[name]), "its own, naming its node"
        assert key.stat().st_mode & 0o004, "readable by the Envoy image's unprivileged user"
        # The same files as the static secrets the ext_proc cluster's mutual TLS names.
        named = {secret["name"]: secret for secret in bootstrap["static_resources"]["secrets"]}
        pair = named[EDGE_CERTIFICATE_SECRET]["tls_certificate"]
        assert (in_volume(service, pair["certificate_chain"]["filename"], volumes),
                in_volume(service, pair["private_key"]["filename"], volumes)) == (cert, key)
        trusted = named[FLEET_CA_SECRET]["validation_context"]["trusted_ca"]["filename"]
        assert in_volume(service, trusted, volumes) == ca, name

    for node in nodes.values():
        assert sorted(p.name for p in volumes[f"{node}-certs"].iterdir()) == [
            "ca.pem", "edge-key.pem", "edge.pem"]
        assert in_volume(control, f"/{node}-certs", volumes) == volumes[f"{node}-certs"]
    for replica in replicas:
        assert sorted(p.name for p in volumes[f"{replica}-certs"].iterdir()) == [
            "ca.pem", "ext-proc-key.pem", "ext-proc.pem", "redis-password"]
        assert in_volume(control, f"/{replica}-certs", volumes) == volumes[f"{replica}-certs"]
    assert sorted(p.name for p in volumes["redis-secret"].iterdir()) == [
        "redis-password", "redis.conf"]
    assert sorted(p.name for p in volumes["redis-tls"].iterdir()) == [
        "ca.pem", "redis-key.pem", "redis.pem"]
    def pki_files() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in volumes["pki"].rglob("*") if p.is_file()}

    before = pki_files()
    again = subprocess.run([shell, str(host_path(control, script)), "true"], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0, again.stderr
    assert pki_files() == before, "kept on restart"
    # Last: it skips without redis-server, and nothing above may be skipped with it.
    redis_healthcheck_passes_only_with_the_password(
        redis, volumes, tmp_path, of_kind(services, "ext_proc"), control)
