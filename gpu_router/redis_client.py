"""How gpu-router's processes dial the fleet's Redis (gpu_router/redis_service.py): ext_proc's
workers for the rate-limit counters, the control plane to retire a revoked replica's user.
redis-py is imported inside each function: only processes given a Redis load it."""

from __future__ import annotations

import ssl
from typing import Any

from gpu_router.pki import TlsFiles
from gpu_router.tls_renewal import Renewing


def redis_url_problem(url: str, user_hint: str) -> str | None:
    """What is wrong with the URL given as --redis, read as redis-py reads it (`user_hint`: how
    the process is told its Redis user); None when nothing is."""
    from redis.connection import parse_url

    try:
        parsed = parse_url(url)
    except ValueError as error:  # not redis://, rediss:// or unix://; the URL is not repeated
        return f"--redis: {error}"
    if parsed.get("password"):  # in the user part or in ?password=
        return ("--redis holds a password, which every local user can read on the command "
                "line (and which logs would repeat): put it in --redis-password-file")
    if parsed.get("username"):  # the user goes with its password: both flags, or neither
        return f"--redis names a user: {user_hint}"
    return None


def connection_pool(url: str, *, user: str | None, password: str | None,
                    tls: TlsFiles | None, timeout_s: float, max_connections: int,
                    connect_timeout_s: float | None = None) -> Any:
    """redis-py's asyncio pool for `url`, each round trip bounded by `timeout_s` and each connect
    (name lookup, TCP and TLS) by `connect_timeout_s` (None: `timeout_s`). A
    rediss:// URL with the process's own TLS files: mutual TLS with its certificate, Redis's
    checked against the fleet's CA only and the host dialled (Compose's Redis has one, made by
    `gpu-router certs init --redis HOST`), every connection on one SSL context made here:
    redis-py makes one per connection from the system's CA store (~45 ms on the event loop,
    measured), which under load failed ext_proc's limits open and stalled its other streams.
    The context is made anew when the files are renewed (tls_renewal.py), for the connections
    made from then on."""
    from redis.asyncio.connection import BlockingConnectionPool, SSLConnection, parse_url

    # No CLIENT SETINFO on connecting (driver_info None): our users may run only their own
    # commands, and Redis 7.2+ would log each refused SETINFO among real refusals.
    options: dict[str, Any] = {**parse_url(url), "username": user, "password": password,
                               "socket_timeout": timeout_s,
                               "socket_connect_timeout": (timeout_s if connect_timeout_s is None
                                                          else connect_timeout_s),
                               "driver_info": None}
    if tls is not None and options.get("connection_class") is SSLConnection:
        contexts = Renewing(tls, _client_context)

        class FleetTlsConnection(SSLConnection):
            def _connection_arguments(self) -> Any:  # called as each connection is made
                contexts.refresh()
                self.ssl_context.context = contexts.current  # RedisSSLContext.get()'s answer
                return super()._connection_arguments()

        options["connection_class"] = FleetTlsConnection
    # No wait of its own for a free connection: the caller's round trip bounds it.
    return BlockingConnectionPool(max_connections=max_connections, timeout=None, **options)


def _client_context(tls: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # the peer's certificate and name
    context.load_verify_locations(cafile=str(tls.ca))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    return context
