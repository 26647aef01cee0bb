"""The benches' fast upstream behaves as a provider does on a real Envoy: it keeps a client's
connection across requests. When it answered before reading the body, Envoy closed every
connection, and each Envoy benched in front of it paid a new upstream connection per request."""

import http.client
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from rig import COMPLETION, UPSTREAM_MAX_BODY, admin_of, chat_body, direct_envoy, fast_upstream

from gpu_router.processes import free_port

REQUESTS = 20


def test_the_fast_upstream_keeps_each_connection_for_many_requests(tmp_path: Path) -> None:
    upstream_port, direct_port = free_port(), free_port()
    upstream = fast_upstream(tmp_path, upstream_port)
    try:
        direct = direct_envoy(tmp_path, direct_port, upstream_port)
        try:
            client = http.client.HTTPConnection("127.0.0.1", direct_port, timeout=10)
            # Small and large bodies: the large one arrives in many reads.
            for size in [64] * (REQUESTS - 1) + [UPSTREAM_MAX_BODY // 2]:
                client.request("POST", "/v1/chat/completions", chat_body(size),
                               {"content-type": "application/json"})
                response = client.getresponse()
                assert (response.status, response.read()) == (200, COMPLETION.encode())
                assert response.getheader("connection") != "close"
            client.close()
            stats = admin_of(tmp_path, "direct").stats("cluster.upstream.")
        finally:
            direct.stop()
    finally:
        upstream.stop()
    assert stats["cluster.upstream.upstream_rq_total"] == REQUESTS
    assert stats["cluster.upstream.upstream_cx_total"] == 1
