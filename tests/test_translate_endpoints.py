"""EDS assignments: which providers get one, and what each endpoint says."""

from __future__ import annotations

import pytest
from translate_fixtures import provider, routing_config

from control_plane.translate.endpoints import endpoint_assignments, ip_address, load_assignment


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("localhost", "127.0.0.1"),
        ("[::1]", "::1"),
        ("10.1.2.3", "10.1.2.3"),
        ("api.example.com", None),
        ("localhost.example.com", None),
    ],
)
def test_ip_address_of_a_host(host: str, expected: str | None) -> None:
    assert ip_address(host) == expected


def test_only_ip_hosts_get_eds_assignments() -> None:
    config = routing_config(
        provider("local", "http://localhost:8101"), provider("named", "https://api.example.com")
    )
    assert list(endpoint_assignments(config)) == ["local"]


def test_assignment_points_at_the_ip_and_is_tagged_with_the_provider() -> None:
    assignment = load_assignment(provider("local", "http://localhost:8101"))
    assert assignment.cluster_name == "local"
    (locality,) = assignment.endpoints
    (endpoint,) = locality.lb_endpoints
    address = endpoint.endpoint.address.socket_address
    assert (address.address, address.port_value) == ("127.0.0.1", 8101)
    assert endpoint.endpoint.hostname == "localhost"
    assert endpoint.metadata.filter_metadata["gpu_router"]["provider"] == "local"
