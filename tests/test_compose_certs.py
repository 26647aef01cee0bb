"""docker-compose.yml's certificates and secrets: the control plane's entrypoint script, run for
real into directories standing in for the volumes, gives each service the files its flags name,
each role's volume that role's key only, and Redis a user per replica and one for the control
plane, each allowed only its own commands (Redis run on the entrypoint's config)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis as redis_client
import yaml
from compose_file import compose_services, flags, host_path, in_volume, of_kind, program
from cryptography import x509

from control_plane.translate.names import EDGE_CERTIFICATE_SECRET, FLEET_CA_SECRET
from gpu_router import pki
from gpu_router.processes import ManagedProcess, free_port, port_open
from gpu_router.redis_service import (
    CONTROL_USER,
    access_rules,
    password_file,
    read_password,
    replica_passwords,
    replica_users,
)


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return compose_services()


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
        return refused(lambda: client.config_get("dir"))
    finally:
        client.close()


def refused(command: Callable[[], object]) -> bool:
    """Whether Redis refuses `command` to the user it runs as."""
    try:
        command()
    except redis_client.exceptions.NoPermissionError:
        return True
    return False


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
        return deleted and refused(lambda: client.get("gpu-router:rl:compose:1"))
    finally:
        client.close()


def role_of_file(path: Path) -> tuple[pki.Role, str] | None:
    [uri] = pki.uri_sans(x509.load_pem_x509_certificate(path.read_bytes()))
    return pki.role_of(uri)


def sds_secrets(service: dict[str, Any]) -> list[str]:
    """The SDS files an Envoy service's bootstrap reads its xDS cluster's secrets from."""
    bootstrap = yaml.safe_load(host_path(service, flags(service["command"])["-c"][0]).read_text())
    [xds] = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "gpu-router.xds"]
    context = xds["transport_socket"]["typed_config"]["common_tls_context"]
    [certificate] = context["tls_certificate_sds_secret_configs"]
    authority = context["combined_validation_context"]["validation_context_sds_secret_config"]
    return [config["sds_config"]["path_config_source"]["path"]
            for config in (certificate, authority)]


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
    [redis] = [s for s in services.values() if program(s["command"]) == "redis-server"]
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
        # The SDS files both of the node's TLS contexts read (the xDS cluster's, and the ext_proc
        # cluster's, which the control plane points at the same files).
        named = {}
        for secret in sds_secrets(service):
            [resource] = yaml.safe_load(host_path(service, secret).read_text())["resources"]
            named[resource["name"]] = resource
        pair = named[EDGE_CERTIFICATE_SECRET]["tls_certificate"]
        cert = in_volume(service, pair["certificate_chain"]["filename"], volumes)
        key = in_volume(service, pair["private_key"]["filename"], volumes)
        trusted = named[FLEET_CA_SECRET]["validation_context"]["trusted_ca"]["filename"]
        ca = in_volume(service, trusted, volumes)
        assert cert.is_file() and key.is_file() and ca.is_file(), name
        assert role_of_file(cert) == (pki.Role.EDGE, nodes[name]), "its own, naming its node"
        assert key.stat().st_mode & 0o004, "readable by the Envoy image's unprivileged user"

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
