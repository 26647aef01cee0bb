"""The control plane's gRPC port and ext_proc's, attacked with real gRPC clients while a real
stack runs on them.

Provider keys are SDS secrets and the ledger is fed by access logs: only a client holding an
edge certificate from the stack's CA may have either, and only for the node its certificate
names. Every other client, plaintext, TLS without a certificate, or an ext_proc replica's
certificate, is refused, and the edge Envoys of the same stack keep routing (the stack would
not start otherwise). ext_proc decides for edge certificates only. A provider key rotated in
its file reaches the provider's requests without any restart.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.load_stats.v3 import lrs_pb2, lrs_pb2_grpc
from polling import eventually
from stack_harness import (
    BATCH,
    CLI,
    CLIENTS,
    MODEL,
    Providers,
    Traffic,
    chat,
    default_stack,
    refusals,
)

from control_plane.telemetry.als import ATTEMPT_LOG_NAME, EDGE_LOG_NAME
from control_plane.translate.fallback_routes import FALLBACK_REASON
from control_plane.translate.names import credential_secret
from control_plane.xds import type_urls
from ext_proc import healthcheck
from gpu_router import pki
from gpu_router.grpc_tls import channel_credentials
from gpu_router.stack import Stack

KEYED = "vast"
"""The provider whose key comes from a file; batch llama-3.1-8b goes there (cheapest)."""
SECRET = credential_secret(KEYED)
EDGE_CLUSTER, EXT_PROC_CLUSTER = "gpu-router-edge", "gpu-router-ext-proc"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    directory = tmp_path_factory.mktemp("security")
    key_file = directory / "vast.key"
    key_file.write_text("key-one\n")

    def with_key(document: dict) -> None:
        vast = next(p for p in document["providers"] if p["name"] == KEYED)
        vast["credentials"] = {"file": str(key_file)}

    with default_stack(directory, with_key) as running:
        yield running, key_file


@pytest.fixture
def stack(keyed: tuple[Stack, Path]) -> Stack:
    return keyed[0]


def target(stack: Stack) -> str:
    return f"127.0.0.1:{stack.ports.xds}"


def mtls(stack: Stack, role: pki.Role, name: str) -> grpc.Channel:
    credentials = channel_credentials(stack.tls(role, name))
    return grpc.secure_channel(target(stack), credentials)


def ask_for_the_key(channel: grpc.Channel, cluster: str,
                    node_id: str = "probe") -> tuple[grpc.StatusCode, list[str]]:
    """One ADS stream asking for the keyed provider's secret: how it ended, the secrets sent."""
    request = discovery_pb2.DiscoveryRequest(
        node=base_pb2.Node(id=node_id, cluster=cluster),
        type_url=type_urls.SECRET,
        resource_names=[SECRET],
    )
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    received: list[str] = []
    try:
        for response in stub.StreamAggregatedResources(iter([request]), timeout=10):
            for resource in response.resources:
                secret = secret_pb2.Secret()
                resource.Unpack(secret)
                received.append(secret.generic_secret.secret.inline_string)
    except grpc.RpcError as error:
        return error.code(), received
    return grpc.StatusCode.OK, received


def test_an_edge_certificate_gets_the_key(stack: Stack) -> None:
    """The control for the refusals below: the same request with an edge certificate works."""
    with mtls(stack, pki.Role.EDGE, "probe") as channel:
        assert ask_for_the_key(channel, EDGE_CLUSTER) == (grpc.StatusCode.OK, ["Bearer key-one"])


def test_a_plaintext_client_gets_nothing(stack: Stack) -> None:
    with grpc.insecure_channel(target(stack)) as channel:
        code, secrets = ask_for_the_key(channel, EDGE_CLUSTER)
    assert (code, secrets) == (grpc.StatusCode.UNAVAILABLE, [])


def test_a_tls_client_without_a_certificate_fails_the_handshake(stack: Stack) -> None:
    ca = stack.tls(pki.Role.CONTROL_PLANE, pki.Role.CONTROL_PLANE.value).ca.read_bytes()
    with grpc.secure_channel(target(stack), grpc.ssl_channel_credentials(ca)) as channel:
        code, secrets = ask_for_the_key(channel, EDGE_CLUSTER)
    assert (code, secrets) == (grpc.StatusCode.UNAVAILABLE, [])


def test_an_edge_certificate_from_another_ca_fails_the_handshake(
    stack: Stack, tmp_path: Path
) -> None:
    _, cert, key = pki.ensure(tmp_path, [pki.Identity(pki.Role.EDGE, "edge-1")])["edge-1"].read()
    theirs = stack.tls(pki.Role.CONTROL_PLANE, pki.Role.CONTROL_PLANE.value).ca.read_bytes()
    credentials = grpc.ssl_channel_credentials(theirs, key, cert)
    with grpc.secure_channel(target(stack), credentials) as channel:
        assert ask_for_the_key(channel, EDGE_CLUSTER) == (grpc.StatusCode.UNAVAILABLE, [])


def test_an_edge_certificate_claiming_to_be_ext_proc_is_refused(stack: Stack) -> None:
    with mtls(stack, pki.Role.EDGE, "probe") as channel:
        assert ask_for_the_key(channel, EXT_PROC_CLUSTER) == (grpc.StatusCode.PERMISSION_DENIED, [])


@pytest.mark.parametrize("claimed", [EXT_PROC_CLUSTER, EDGE_CLUSTER])
def test_an_ext_proc_certificate_never_gets_a_key_whatever_it_claims(
    stack: Stack, claimed: str
) -> None:
    before = len(refusals(stack))
    with mtls(stack, pki.Role.EXT_PROC, "intruder") as channel:
        code, secrets = ask_for_the_key(channel, claimed)
    assert (code, secrets) == (grpc.StatusCode.PERMISSION_DENIED, [])
    [refused] = refusals(stack)[before:]
    assert (refused["role"], refused["peer_name"]) == ("ext-proc", "intruder")
    assert type_urls.SECRET in refused["asked"]


def forged_log(request_id: str, log_name: str = EDGE_LOG_NAME,
               node_id: str = "probe") -> list[als_pb2.StreamAccessLogsMessage]:
    """One believable entry on `log_name` from node `node_id`: a served client request (the
    edge log), or a 503 attempt to runpod just now (the attempt log, which `why` keeps per
    request; not KEYED, whose health the key rotation test below needs intact)."""
    entry = accesslog_pb2.HTTPAccessLogEntry(
        request=accesslog_pb2.HTTPRequestProperties(request_id=request_id, path="/v1/chat/completions"),
        response=accesslog_pb2.HTTPResponseProperties(),
    )
    entry.response.response_code.value = 200
    if log_name == ATTEMPT_LOG_NAME:
        entry.common_properties.upstream_cluster = "runpod"
        entry.common_properties.start_time.GetCurrentTime()
        entry.response.response_code.value = 503
    return [
        als_pb2.StreamAccessLogsMessage(
            identifier=als_pb2.StreamAccessLogsMessage.Identifier(
                node=base_pb2.Node(id=node_id, cluster=EDGE_CLUSTER), log_name=log_name
            ),
            http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=[entry]),
        )
    ]


def send_access_log(channel: grpc.Channel, request_id: str, log_name: str = EDGE_LOG_NAME,
                    node_id: str = "probe") -> grpc.StatusCode:
    stub = als_pb2_grpc.AccessLogServiceStub(channel)
    try:
        stub.StreamAccessLogs(iter(forged_log(request_id, log_name, node_id)), timeout=10)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def ledger_rows(stack: Stack, table: str, request_id: str) -> int:
    """Rows of the ledger's `table` (requests: booked; attempts: kept for why) for one id."""
    with sqlite3.connect(stack.log_dir / "ledger.db") as ledger:
        [(count,)] = ledger.execute(
            f"SELECT count(*) FROM {table} WHERE request_id = ?", (request_id,)
        ).fetchall()
    return count


def booked(stack: Stack, request_id: str) -> int:
    return ledger_rows(stack, "requests", request_id)


def send_load_report(channel: grpc.Channel, node_id: str) -> grpc.StatusCode:
    """How a load-report stream naming `node_id` ends (the first report is its identity)."""
    reports = lrs_pb2_grpc.LoadReportingServiceStub(channel).StreamLoadStats(
        iter([lrs_pb2.LoadStatsRequest(node=base_pb2.Node(id=node_id))]), timeout=10)
    try:
        list(reports)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_access_logs_and_load_reports_only_from_edge_certificates(stack: Stack) -> None:
    before = len(refusals(stack))
    with grpc.insecure_channel(target(stack)) as channel:
        assert send_access_log(channel, "forged-plain") == grpc.StatusCode.UNAVAILABLE
    with mtls(stack, pki.Role.EXT_PROC, "intruder") as channel:
        assert send_access_log(channel, "forged-ext-proc") == grpc.StatusCode.PERMISSION_DENIED
        assert send_load_report(channel, "edge-1") == grpc.StatusCode.PERMISSION_DENIED
    with mtls(stack, pki.Role.EDGE, "probe") as channel:
        assert send_access_log(channel, "from-an-edge") == grpc.StatusCode.OK
    asked = [entry["asked"] for entry in refusals(stack)[before:]]
    assert asked == ["access logs", "load reports"]
    # The same entry from an edge is booked: without this, a forged one the ledger had not
    # written yet would pass the check below.
    eventually(lambda: booked(stack, "from-an-edge") == 1, "the edge's entry in the ledger")
    assert booked(stack, "forged-ext-proc") == 0


def test_an_edge_certificate_speaks_only_for_the_node_it_names(stack: Stack) -> None:
    """Listener ports and health samples go by node id: the edge certificate
    "probe" cannot pose as edge-1 on any of the three streams (edge-1 itself routes on)."""
    before = len(refusals(stack))
    with mtls(stack, pki.Role.EDGE, "probe") as channel:
        request = discovery_pb2.DiscoveryRequest(
            node=base_pb2.Node(id="edge-1", cluster=EDGE_CLUSTER), type_url=type_urls.SECRET,
            resource_names=[SECRET])
        with pytest.raises(grpc.RpcError) as xds:
            list(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
                iter([request]), timeout=10))
        assert xds.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert send_access_log(channel, "posing-as-edge-1", node_id="edge-1") == (
            grpc.StatusCode.PERMISSION_DENIED)
        assert send_load_report(channel, "edge-1") == grpc.StatusCode.PERMISSION_DENIED
    refused = refusals(stack)[before:]
    assert {entry["reason"] for entry in refused} == {
        "the node id is not the name in the certificate"}
    assert [entry["peer_name"] for entry in refused] == ["probe"] * 3
    assert booked(stack, "posing-as-edge-1") == 0
    assert chat(stack, "llama-3.1-8b")[0] == 200


def test_failed_attempts_for_why_only_from_edge_certificates(stack: Stack) -> None:
    """The attempt log feeds fleet health and each request's story in `why`: another role's
    certificate is refused before an entry is read, an edge's is kept."""
    with mtls(stack, pki.Role.EXT_PROC, "intruder") as channel:
        assert send_access_log(channel, "forged-attempt", ATTEMPT_LOG_NAME) == (
            grpc.StatusCode.PERMISSION_DENIED)
    with mtls(stack, pki.Role.EDGE, "probe") as channel:
        assert send_access_log(channel, "edge-attempt", ATTEMPT_LOG_NAME) == grpc.StatusCode.OK
    eventually(lambda: ledger_rows(stack, "attempts", "edge-attempt") == 1, "the edge's attempt kept")
    assert ledger_rows(stack, "attempts", "forged-attempt") == 0


def test_a_key_rotated_in_its_file_reaches_the_provider(
    keyed: tuple[Stack, Path], stack: Stack
) -> None:
    _, key_file = keyed
    providers = Providers(stack.policy)

    def key_sent() -> str:
        status, headers, body = chat(stack, "llama-3.1-8b", {"x-workload": "batch"})
        assert status == 200 and headers["x-gpu-router-provider"] == KEYED, body
        return providers.stats(KEYED)["last_request"]["headers"]["authorization"]

    assert key_sent() == "Bearer key-one"
    key_file.write_text("key-two\n")
    eventually(lambda: key_sent() == "Bearer key-two", "the new key at the provider", interval=0.2)
    with mtls(stack, pki.Role.EDGE, "probe") as channel:
        assert ask_for_the_key(channel, EDGE_CLUSTER) == (grpc.StatusCode.OK, ["Bearer key-two"])


def ask_ext_proc(stack: Stack, files: pki.TlsFiles | None) -> grpc.StatusCode:
    """One decision asked of the stack's ext_proc port, over mutual TLS as `files`' holder
    (None: plaintext): how the stream ended."""
    request = ext_proc_pb2.ProcessingRequest(request_headers=ext_proc_pb2.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[
            base_pb2.HeaderValue(key=":path", raw_value=b"/v1/chat/completions"),
            base_pb2.HeaderValue(key="x-gpu-router-model", raw_value=b"llama-3.1-8b")])))
    address = f"127.0.0.1:{stack.ports.ext_proc}"
    with (grpc.insecure_channel(address) if files is None
          else healthcheck.channel(address, files)) as channel:
        try:
            [answer] = ext_proc_grpc.ExternalProcessorStub(channel).Process(iter([request]),
                                                                             timeout=10)
        except grpc.RpcError as error:
            return error.code()
    assert answer.request_headers.response.header_mutation.set_headers
    return grpc.StatusCode.OK


def test_ext_proc_decides_for_edge_certificates_only(stack: Stack) -> None:
    """The port every edge asks for decisions takes mutual TLS only, and of the fleet's
    certificates only an edge's; the stack's own Envoy is one (it routes, above)."""
    assert ask_ext_proc(stack, None) == grpc.StatusCode.UNAVAILABLE
    replica = stack.tls(pki.Role.EXT_PROC, "ext-proc-probe")
    assert ask_ext_proc(stack, replica) == grpc.StatusCode.PERMISSION_DENIED
    assert ask_ext_proc(stack, stack.tls(pki.Role.EDGE, "probe")) == grpc.StatusCode.OK
    lines = stack.processes["ext-proc-1"].log_path.read_text().splitlines()
    refused = [json.loads(line) for line in lines if '"peer_refused"' in line]
    assert refused and refused[-1]["identities"] == ["spiffe://gpu-router/ext-proc/ext-proc-probe",
                                                     "ext-proc.gpu-router"]
    # The control plane's peer_refused fields (xds/peer.py), so one query finds both.
    assert (refused[-1]["role"], refused[-1]["peer_name"]) == ("ext-proc", "ext-proc-probe")
    assert refused[-1]["reason"].startswith("only an edge Envoy's certificate")


def test_a_revoked_edge_certificate_is_refused_on_every_port_without_a_restart(
    stack: Stack, tmp_path: Path,
) -> None:
    """A stolen edge key: `gpu-router certs revoke` puts its certificate on the CA's CRL. Within
    a second, new streams on the control plane's port (no key) and ext_proc's (which has no copy
    of the file: the control plane sends it the CRL over xDS) are refused, and
    an access-log stream and an xDS stream opened before end at their next message (the entry
    is not booked); the stack's own edges route on. The revoked pair leaves the certs directory."""
    issued = stack.tls(pki.Role.EDGE, "stolen")
    stolen = pki.TlsFiles(*(Path(shutil.copy(path, tmp_path)) for path in
                            (issued.ca, issued.cert, issued.key)))  # the thief's copy
    with grpc.secure_channel(target(stack), channel_credentials(stolen)) as channel:
        code, keys = ask_for_the_key(channel, EDGE_CLUSTER, "stolen")
        assert (code, len(keys)) == (grpc.StatusCode.OK, 1)
    assert ask_ext_proc(stack, stolen) == grpc.StatusCode.OK
    revoked = threading.Event()

    def entries() -> Iterator[als_pb2.StreamAccessLogsMessage]:
        yield from forged_log("before-revoking", node_id="stolen")
        revoked.wait(30)
        yield from forged_log("after-revoking", node_id="stolen")

    def subscriptions() -> Iterator[discovery_pb2.DiscoveryRequest]:
        asked = discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="stolen", cluster=EDGE_CLUSTER),
                                               type_url=type_urls.SECRET, resource_names=[SECRET])
        yield asked
        revoked.wait(30)
        yield asked

    # The stack's own edge routes on throughout: 64 clients, none failing (a few take the
    # fallback route while the edge swaps in the ext_proc cluster with the new CRL).
    with Traffic(stack, MODEL, BATCH, threads=CLIENTS) as traffic:
        before = len(refusals(stack))
        open_stream = grpc.secure_channel(target(stack), channel_credentials(stolen))
        try:
            stream = als_pb2_grpc.AccessLogServiceStub(open_stream).StreamAccessLogs.future(
                entries(), timeout=60)
            xds = ads_pb2_grpc.AggregatedDiscoveryServiceStub(open_stream).StreamAggregatedResources(
                subscriptions(), timeout=60)
            assert next(xds).resources  # the key, while the certificate is good
            eventually(lambda: booked(stack, "before-revoking") == 1, "the entry sent before")
            result = subprocess.run([*CLI, "certs", "revoke", "--dir", str(stack.certs), "stolen"],
                                    capture_output=True, text=True, check=False)
            assert result.returncode == 0, result.stderr
            assert not issued.cert.exists() and not issued.key.exists()
            with grpc.secure_channel(target(stack), channel_credentials(stolen)) as channel:
                eventually(lambda: ask_for_the_key(channel, EDGE_CLUSTER, "stolen")
                           == (grpc.StatusCode.UNAUTHENTICATED, []), "a new stream refused")
            revoked.set()
            with pytest.raises(grpc.RpcError) as ended:
                stream.result()
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as ended:
                list(xds)  # the open xDS stream: refused at its next request, before any response
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            revoked.set()
            open_stream.close()
        eventually(lambda: ask_ext_proc(stack, stolen) == grpc.StatusCode.PERMISSION_DENIED,
                   "ext_proc refusing it")
        assert booked(stack, "after-revoking") == 0
        reasons = [(entry["peer_name"], entry["reason"]) for entry in refusals(stack)[before:]]
        assert set(reasons) == {("stolen", "the client certificate is revoked")}
    assert traffic.total() and traffic.failures() == {}, traffic.failed
    status, headers, body = chat(stack, MODEL, BATCH)
    assert status == 200 and headers["x-gpu-router-reason"] != FALLBACK_REASON, body
