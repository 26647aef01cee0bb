"""The ext_proc cluster's detection of a frozen, overloaded or not-yet-ready replica."""

from __future__ import annotations

from control_plane.translate.clusters import ext_proc_cluster
from control_plane.translate.settings import EdgeSettings


def test_replicas_are_health_checked_over_grpc_health_often_with_or_without_traffic() -> None:
    (check,) = ext_proc_cluster(EdgeSettings()).health_checks
    assert check.grpc_health_check.service_name == "envoy.service.ext_proc.v3.ExternalProcessor"
    assert check.interval.ToMilliseconds() == 250
    assert check.no_traffic_interval == check.interval  # Envoy's default is 60 s
    assert check.timeout.ToMilliseconds() == 150
    assert (check.unhealthy_threshold.value, check.healthy_threshold.value) == (2, 1)


def test_with_no_healthy_replica_envoy_fails_the_stream_instead_of_panicking() -> None:
    lb = ext_proc_cluster(EdgeSettings()).common_lb_config
    assert lb.HasField("healthy_panic_threshold")
    assert lb.healthy_panic_threshold.value == 0
