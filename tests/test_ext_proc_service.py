"""`python -m ext_proc` over real gRPC: a fake ADS in the test, a client playing Envoy."""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from ext_proc_fixtures import (
    HEALTH_TYPE_URL,
    POLICY_TYPE_URL,
    FakeAds,
    body_request,
    default_policy,
    edge_channel,
    headers_request,
    snapshot,
)
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from polling import eventually

from ext_proc import healthcheck
from gpu_router import pki
from gpu_router.processes import ManagedProcess, free_port, port_open, python_module


@pytest.fixture
def ads() -> Iterator[FakeAds]:
    with FakeAds() as server:
        yield server


@pytest.fixture
def ext_proc(ads: FakeAds, tmp_path: Path) -> Iterator[tuple[ManagedProcess, str]]:
    port = free_port()
    process = python_module(
        "ext_proc",
        "ext_proc",
        [
            "--listen",
            f"127.0.0.1:{port}",
            "--xds",
            ads.target,
            "--workers",
            "2",
            "--log-level",
            "info",
            *ads.client_flags(),
        ],
        tmp_path,
    )
    process.start()
    try:
        process.wait_until(lambda: port_open(port), "the ext_proc port")
        yield process, f"127.0.0.1:{port}"
    finally:
        process.stop()


def process(
    target: str, *requests: ext_proc_pb2.ProcessingRequest
) -> list[ext_proc_pb2.ProcessingResponse]:
    """One ext_proc stream, as Envoy drives it: a message, its answer, the next message."""
    with edge_channel(target) as channel:
        return list(
            ext_proc_grpc.ExternalProcessorStub(channel).Process(iter(requests), timeout=10)
        )


def both_workers_acked(ads: FakeAds, version: str, type_url: str = POLICY_TYPE_URL) -> bool:
    """Both workers ACKed `version` of the routing policy, or of `type_url` (each ACKs it once;
    ACKs carry no node, as in Envoy: the node is on a stream's first request only)."""
    acks = [r for r in ads.requests_for(type_url)
            if r.version_info == version and not r.HasField("error_detail")]
    return len(acks) >= 2


def test_not_ready_then_routes_once_the_policy_arrives(
    ads: FakeAds, ext_proc: tuple[ManagedProcess, str]
) -> None:
    running, target = ext_proc

    def serving() -> list[dict]:
        lines = running.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if '"ext_proc worker serving"' in line]

    eventually(lambda: len(serving()) == 2, "both workers serving")
    assert [line["event_loop"] for line in serving()] == ["uvloop"] * 2  # the cheaper loop
    with pytest.raises(grpc.RpcError) as not_ready:  # Envoy fails open onto its fallback route
        process(target, headers_request())
    assert not_ready.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no routing policy" in not_ready.value.details()
    ads.publish(POLICY_TYPE_URL, "v1", default_policy("v1"))
    eventually(lambda: both_workers_acked(ads, "v1"), "both workers to ACK v1")
    nodes = {r.node.id for r in ads.requests_for(POLICY_TYPE_URL) if r.node.id}
    assert len(nodes) == 2 and all(n.startswith("ext-proc-") for n in nodes)
    assert {r.node.cluster for r in ads.requests_for(POLICY_TYPE_URL) if r.node.id} == {
        "gpu-router-ext-proc"
    }
    for _ in range(8):  # several connections: SO_REUSEPORT spreads them over both workers
        [response] = process(
            target, headers_request(x_request_id="r-1", body_fields={"model": "mixtral"})
        )
        mutation = response.request_headers.response.header_mutation
        assert [(h.header.key, h.header.raw_value) for h in mutation.set_headers] == [
            ("x-gpu-router-route", b"interactive/mixtral-8x7b/2")
        ]
        audit = json_format.MessageToDict(response.dynamic_metadata)["gpu_router"]
        assert audit["model"] == "mixtral-8x7b" and "request_id" not in audit
        assert audit["priority_groups"] == [{"name": "lambda"}, {"name": "runpod"}]


def test_the_providers_at_cap_are_those_of_the_edge_the_certificate_names(
    ads: FakeAds, ext_proc: tuple[ManagedProcess, str]
) -> None:
    """The fleet's at_cap is per edge: a request from the edge certified as edge-test spills
    past the providers edge-test has at their cap, and not past another edge's."""
    _, target = ext_proc
    ads.publish(POLICY_TYPE_URL, "v1", default_policy("v1"))
    eventually(lambda: both_workers_acked(ads, "v1"), "the policy in every worker")
    request = headers_request(body_fields={"model": "mixtral"})

    def order_and_reason(health_version: str, at_cap: dict[str, list[str]]) -> tuple[list, str]:
        message = snapshot()
        for edge, providers in at_cap.items():
            message.at_cap.add(edge=edge, providers=providers)
        ads.publish(HEALTH_TYPE_URL, health_version, message)
        eventually(lambda: both_workers_acked(ads, health_version, HEALTH_TYPE_URL),
                   f"health {health_version} in every worker")
        answers = [process(target, request)[0] for _ in range(8)]  # both workers
        audits = [json_format.MessageToDict(a.dynamic_metadata)["gpu_router"] for a in answers]
        assert len({json.dumps(a, sort_keys=True) for a in audits}) == 1, audits
        return [g["name"] for g in audits[0]["priority_groups"]], audits[0]["reason"]

    order, reason = order_and_reason("h1", {"edge-other": ["lambda"]})
    assert order == ["lambda", "runpod"] and "max_concurrency" not in reason
    order, reason = order_and_reason("h2", {"edge-test": ["lambda"], "edge-other": ["runpod"]})
    assert order == ["runpod", "lambda"]
    assert reason.endswith("; lambda at max_concurrency: runpod first")


def serving_status(target: str, service: str) -> int:
    """One grpc.health.v1 Check on a fresh connection (SO_REUSEPORT picks the worker)."""
    with edge_channel(target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    return answer.status


EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
"""The service Envoy's health check of the ext_proc cluster asks about."""


def test_health_is_not_serving_until_the_policy_then_serving_without_the_control_plane(
    ads: FakeAds, ext_proc: tuple[ManagedProcess, str]
) -> None:
    _, target = ext_proc
    for _ in range(8):  # both workers, whichever takes each connection
        for service in ("", EXT_PROC_SERVICE):
            assert serving_status(target, service) == health_pb2.HealthCheckResponse.NOT_SERVING
    # The container health check presents the replica's own certificate: health answers any role.
    assert healthcheck.main([target, *FakeAds.client_flags()]) == 1  # not yet
    ads.publish(POLICY_TYPE_URL, "v1", default_policy("v1"))
    eventually(lambda: both_workers_acked(ads, "v1"), "both workers to ACK v1")
    ads.stop()  # a worker keeps serving on its last policy while the control plane is away
    eventually(
        lambda: all(
            serving_status(target, service) == health_pb2.HealthCheckResponse.SERVING
            for _ in range(8)
            for service in ("", EXT_PROC_SERVICE)
        ),
        "every worker to report SERVING",
    )
    with pytest.raises(grpc.RpcError) as unknown:
        serving_status(target, "some.other.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert healthcheck.main([target, *FakeAds.client_flags()]) == 0
    assert healthcheck.serving(f"127.0.0.1:{free_port()}", FakeAds.client_files(),
                               timeout_s=1)[0] is False


def test_the_stream_ends_with_its_one_answer(
    ads: FakeAds, ext_proc: tuple[ManagedProcess, str]
) -> None:
    """Whether or not the peer half-closes or sends more (Envoy sends nothing more, and resets
    the stream once answered): one answer, then the stream's OK end."""
    _, target = ext_proc
    ads.publish(POLICY_TYPE_URL, "v1", default_policy("v1"))
    request = headers_request(body_fields={"model": "mixtral"})
    eventually(lambda: both_workers_acked(ads, "v1"), "the policy in every worker")
    never_ends = threading.Event()

    def messages() -> Iterator[ext_proc_pb2.ProcessingRequest]:
        yield request
        never_ends.wait(10)  # no half-close: the stream ends from ext_proc's side
        yield body_request(b"{}")

    with edge_channel(target) as channel:
        stream = ext_proc_grpc.ExternalProcessorStub(channel).Process(messages(), timeout=10)
        answers = list(stream)
        code = stream.code()
    never_ends.set()
    assert [a.WhichOneof("response") for a in answers] == ["request_headers"]
    assert code == grpc.StatusCode.OK


def test_out_of_phase_message_fails_the_stream(
    ads: FakeAds, ext_proc: tuple[ManagedProcess, str]
) -> None:
    _, target = ext_proc
    with pytest.raises(grpc.RpcError) as caught:
        process(target, body_request(b"{}"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "unexpected request_body in the headers phase" in caught.value.details()


def test_a_stream_without_request_headers_fails(
    ads: FakeAds, ext_proc: tuple[ManagedProcess, str]
) -> None:
    _, target = ext_proc
    with pytest.raises(grpc.RpcError) as caught:
        process(target)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == "the stream ended before its request headers"


def test_sigterm_stops_every_worker(ext_proc: tuple[ManagedProcess, str]) -> None:
    managed, target = ext_proc
    managed.stop()
    assert managed.popen is not None and managed.popen.returncode == 0
    assert not port_open(int(target.rsplit(":", 1)[1]))
    lines = [
        json.loads(line)
        for line in managed.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    assert lines, "expected JSON-line logs"


def impostor(directory: Path, fleet_ca: Path) -> pki.TlsFiles:
    """A client certificate of the fleet's CA that names an edge only as text gRPC also calls a
    peer identity (its CN and a DNS SAN), with no SPIFFE URI SAN: no role at all."""
    ca_cert = x509.load_pem_x509_certificate(fleet_ca.read_bytes())
    ca_key = serialization.load_pem_private_key(
        (fleet_ca.parent / pki.CA_KEY_FILE).read_bytes(), None)
    edge = pki.Identity(pki.Role.EDGE, "edge-test").spiffe_id
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, edge)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(edge)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    directory.mkdir()
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return pki.TlsFiles(fleet_ca, directory / "cert.pem", directory / "key.pem")


def test_the_port_takes_mutual_tls_from_edges_only(
    ads: FakeAds, ext_proc: tuple[ManagedProcess, str], tmp_path: Path
) -> None:
    """Plaintext, TLS without a client certificate, an edge certificate of another CA (the
    client trusting the fleet's CA, so the refusal is the server's), the fleet's certificate
    of another role, or one naming an edge in its CN and a DNS SAN only: no decision. An
    edge's: one."""
    _, target = ext_proc
    ads.publish(POLICY_TYPE_URL, "v1", default_policy("v1"))
    eventually(lambda: both_workers_acked(ads, "v1"), "the policy in every worker")
    request = headers_request(body_fields={"model": "mixtral"})
    fleet_ca = FakeAds.client_files().ca
    stranger = pki.ensure(tmp_path / "other-ca", [pki.Identity(pki.Role.EDGE, "edge-test")])
    foreign = pki.TlsFiles(fleet_ca, stranger["edge-test"].cert, stranger["edge-test"].key)
    named_in_text_only = impostor(tmp_path / "impostor", fleet_ca)

    def no_certificate() -> grpc.Channel:
        return grpc.secure_channel(
            target, grpc.ssl_channel_credentials(fleet_ca.read_bytes()),
            options=[("grpc.ssl_target_name_override", pki.EXT_PROC_SERVER_NAME)])

    channels = [(lambda: grpc.insecure_channel(target), grpc.StatusCode.UNAVAILABLE),
                (no_certificate, grpc.StatusCode.UNAVAILABLE),
                (lambda: healthcheck.channel(target, foreign), grpc.StatusCode.UNAVAILABLE),
                (lambda: healthcheck.channel(target, FakeAds.client_files()),
                 grpc.StatusCode.PERMISSION_DENIED),
                (lambda: healthcheck.channel(target, named_in_text_only),
                 grpc.StatusCode.PERMISSION_DENIED)]
    for channel_for, code in channels:
        for _ in range(4):  # whichever worker takes the connection
            with channel_for() as channel, pytest.raises(grpc.RpcError) as refused:
                list(ext_proc_grpc.ExternalProcessorStub(channel).Process(iter([request]),
                                                                          timeout=10))
            assert refused.value.code() == code, channel_for
    [answer] = process(target, request)
    assert answer.request_headers.response.header_mutation.set_headers
