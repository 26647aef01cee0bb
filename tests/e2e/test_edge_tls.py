"""The edge listener over TLS (`gpu-router up --edge-tls-cert --edge-tls-key`), on a real stack.

Clients' keys and prompts cross the network to the edge: with a certificate given, the edge
speaks TLS only. The certificate reaches every edge over SDS from the control plane, which
re-reads the files when they change: a rotated certificate is served without a restart, and an
unusable one is refused while the last good one keeps serving. The admin API, given the same
pair, follows it likewise, and so does the launcher's pin of it.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from edge_tls_fixtures import client_context, der, served_certificate, server_pair
from polling import eventually
from stack_harness import (
    chat,
    default_stack,
)

from gpu_router.processes import http_get
from gpu_router.stack import Stack

MODEL = "llama-3.1-8b"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path, Path, Path]]:
    """(stack, ca, cert, key): the stack's edge serves cert/key, which chain to ca."""
    directory = tmp_path_factory.mktemp("edge-tls")
    ca, cert, key = server_pair(directory / "tls")
    with default_stack(directory, edge_tls=(cert, key), admin_tls=(cert, key)) as stack:
        yield stack, ca, cert, key


def test_a_client_that_trusts_the_certificate_is_routed(
    served: tuple[Stack, Path, Path, Path],
) -> None:
    stack, ca, cert, _ = served
    assert stack.url.startswith("https://")
    status, headers, body = chat(stack, MODEL, context=client_context(ca))
    assert status == 200, body
    assert headers["x-gpu-router-provider"] and body["choices"]
    assert served_certificate(stack.edges[0].edge_port) == der(cert)


def test_plain_http_gets_no_answer(served: tuple[Stack, Path, Path, Path]) -> None:
    """Nor from the control plane's admin API, given the same pair (`--http-tls-cert`)."""
    stack, *_ = served
    for port, path in ((stack.edges[0].edge_port, "/v1/models"),
                       (stack.ports.control_http, "/healthz")):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((ConnectionError, http.client.HTTPException)) as failed:
            connection.request("GET", path)
            connection.getresponse().read()
        connection.close()
        assert not isinstance(failed.value, ConnectionRefusedError), "it listens, TLS only"


def test_the_admin_api_over_https_is_what_the_launcher_reads(
    served: tuple[Stack, Path, Path, Path],
) -> None:
    """The stack's own readiness checks (every node in sync, read from /v1/xds with the admin
    token) went to the pinned certificate: the stack started. A client of the CA reads it too."""
    stack, ca, _, _ = served
    assert stack.control_url("/v1/health").startswith("https://")
    status, body = stack.control_get("/v1/policy")
    assert status == 200 and json.loads(body)["version"]
    assert http_get(stack.control_url("/v1/policy"), context=client_context(ca))[0] == 401


def test_a_rotated_certificate_is_served_without_a_restart_and_a_bad_one_never(
    served: tuple[Stack, Path, Path, Path], tmp_path: Path,
) -> None:
    stack, _, cert, key = served
    envoy_pid = stack.edges[0].process.pid
    new_ca, new_cert, new_key = server_pair(tmp_path / "next")
    for source, target in ((new_key, key), (new_cert, cert)):  # key first: one poll may see both
        os.replace(source, target)
    for port in (stack.edges[0].edge_port, stack.ports.control_http):  # the admin API's too
        eventually(lambda port=port: served_certificate(port) == der(cert),
                   f"the new certificate served on {port}")
    status, _, _ = chat(stack, MODEL, context=client_context(new_ca))
    assert status == 200
    assert stack.edges[0].process.pid == envoy_pid
    assert stack.control_get("/v1/policy")[0] == 200  # the launcher follows the renewal

    log = stack.processes["control-plane"].log_path

    def key_rejections(event: str = "policy_rejected") -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()
                if f'"{event}"' in line and "not the key of the certificate" in line]

    # The rotation above may have been polled between its two replaces (a real rejection):
    # only a rejection after this key is replaced says this key was refused.
    before = {event: len(key_rejections(event)) for event in ("policy_rejected",
                                                              "admin_tls_rejected")}
    _, _, other_key = server_pair(tmp_path / "other")
    os.replace(other_key, key)  # not the certificate's key: refused, the last good one stays
    for event, count in before.items():
        rejected = eventually(lambda event=event, count=count: key_rejections(event)[count:],
                              f"the control plane to refuse the mismatched key ({event})")
        assert str(key) in rejected[-1]["error"]
    for port in (stack.edges[0].edge_port, stack.ports.control_http):
        assert served_certificate(port) == der(cert)
    assert chat(stack, MODEL, context=client_context(new_ca))[0] == 200
    assert stack.control_get("/v1/policy")[0] == 200
