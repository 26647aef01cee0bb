"""Port picking for the stack's processes."""

import socket

from gpu_router import processes


def test_free_ports_are_outside_the_ephemeral_range_and_never_repeat() -> None:
    ephemeral = processes._ephemeral_range()
    ports = [processes.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert not [port for port in ports if port in ephemeral]


def test_a_port_in_use_is_never_handed_out(monkeypatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        monkeypatch.setattr(processes, "_ephemeral_range", lambda: range(0))
        real_randrange = processes.random.randrange
        offered = [busy, busy]
        monkeypatch.setattr(processes.random, "randrange",
                            lambda low, high: offered.pop() if offered else real_randrange(low, high))
        assert processes.free_port() != busy
        assert not offered
