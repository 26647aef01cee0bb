"""Revoking an ext_proc replica's certificate while a stack runs: the control plane sends the
fleet's CRL to every edge with the ext_proc cluster, and each edge's TLS handshake to the
revoked replica fails, so requests go on along the fallback routes, until the replica runs on a
new certificate; the control plane refuses the revoked one too. (An edge certificate's
revocation: test_security.py.)"""

from __future__ import annotations

import json
import subprocess

from polling import eventually
from stack_harness import BATCH, CLI, CLIENTS, MODEL, Traffic, chat

from control_plane.translate.fallback_routes import FALLBACK_REASON
from gpu_router import pki
from gpu_router.stack import Stack


def reason(stack: Stack) -> str:
    status, headers, body = chat(stack, MODEL, BATCH)
    assert status == 200, body  # served either way: by ext_proc's decision or the fallback
    return headers["x-gpu-router-reason"]


def test_a_revoked_ext_proc_certificate_fails_every_edges_handshake(stack: Stack) -> None:
    """With 64 clients sending throughout: not one of their requests fails, from before the
    revocation through the fallback to the replica's return on a new certificate."""
    assert reason(stack) != FALLBACK_REASON  # ext_proc decides
    with Traffic(stack, MODEL, BATCH, threads=CLIENTS) as traffic:
        result = subprocess.run(
            [*CLI, "certs", "revoke", "--dir", str(stack.certs), "ext-proc-1"],
            capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        # The replica still runs, with the certificate it loaded at start; the edge refuses it.
        eventually(lambda: reason(stack) == FALLBACK_REASON, "the edge to stop asking ext_proc")
        lines = stack.processes["control-plane"].log_path.read_text().splitlines()
        refused = [json.loads(line) for line in lines if '"peer_refused"' in line]
        assert {(entry["peer_name"], entry["reason"]) for entry in refused} == {
            ("ext-proc-1", "the client certificate is revoked")}
        # The same CRL passes a replica whose certificate it does not name: the replica
        # restarted with a new one (as the next `up` issues it) decides again.
        stack.tls(pki.Role.EXT_PROC, "ext-proc-1")
        stack.restart("ext-proc-1")
        eventually(lambda: reason(stack) != FALLBACK_REASON, "ext_proc to decide again")
        # Each client has at most one request in flight: past CLIENTS more answers, every one
        # was sent once ext_proc decided again.
        returned = traffic.total() + CLIENTS
        eventually(lambda: traffic.total() >= returned + CLIENTS, "the clients to go on")
    assert traffic.failures() == {}, traffic.failed
    reasons = [exchange.reason == FALLBACK_REASON for exchange in traffic.exchanges]
    assert True in reasons[:returned], "the clients saw the fallback"
    assert not any(reasons[returned:]), "then ext_proc again, all of them"
