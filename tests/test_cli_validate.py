"""`gpu-router validate` refuses what `gpu-router up` would: the translation's own checks."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from gpu_router.cli import validate


def _policy(path: Path, providers: int) -> Path:
    price = {"input": 0.1, "output": 0.1, "cached_input": 0.05, "reasoning": 0.1}
    path.write_text(yaml.safe_dump({
        "version": 1,
        "providers": [{"name": f"p{i}", "base_url": f"http://127.0.0.1:{9000 + i}",
                       "health_check_path": "/health", "gpus": [{"type": "H100", "memory_gb": 80}],
                       "models": [{"name": "m", "id": "m", "gpu": "H100", "price": price}]}
                      for i in range(providers)],
        "models": [{"name": "m", "min_gpu_memory_gb": 1}],
        "policies": [
            {"name": "embed", "strategy": "cost", "max_fallbacks": 2,
             "match": {"path_prefix": "/v1/embeddings"}},
            {"name": "fast", "strategy": "latency", "max_fallbacks": 2,
             "match": {"headers": {"x-workload": "interactive"}}},
            {"name": "rest", "strategy": "balanced", "max_fallbacks": 2},
        ],
    }))
    return path


def test_a_policy_over_the_route_limit_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _policy(tmp_path / "big.yaml", providers=16)

    assert validate(argparse.Namespace(files=[str(path)])) == 1
    assert "more than 5000" in capsys.readouterr().err


def test_a_translatable_policy_is_ok(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _policy(tmp_path / "small.yaml", providers=4)

    assert validate(argparse.Namespace(files=[str(path)])) == 0
    assert ": ok (4 providers" in capsys.readouterr().out
