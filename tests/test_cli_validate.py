"""`gpu-router validate` refuses what `gpu-router up` would: the translation's own checks."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from gpu_router.cli import validate


def _policy(path: Path, providers: int, models: int = 1, workloads: int = 1) -> Path:
    """`providers` providers offering `models` models under `workloads` header-matched
    policies plus an embeddings and a catch-all one."""
    price = {"input": 0.1, "output": 0.1, "cached_input": 0.05, "reasoning": 0.1}
    names = [f"m{i}" for i in range(models)]
    path.write_text(yaml.safe_dump({
        "version": 1,
        "providers": [{"name": f"p{i}", "base_url": f"http://127.0.0.1:{9000 + i}",
                       "health_check_path": "/health", "gpus": [{"type": "H100", "memory_gb": 80}],
                       "models": [{"name": m, "id": m, "gpu": "H100", "price": price}
                                  for m in names]}
                      for i in range(providers)],
        "models": [{"name": m, "min_gpu_memory_gb": 1} for m in names],
        "policies": [
            {"name": "embed", "strategy": "cost", "max_fallbacks": 2,
             "match": {"path_prefix": "/v1/embeddings"}},
            *({"name": f"fast-{i}", "strategy": "latency", "max_fallbacks": 2,
               "match": {"headers": {"x-workload": f"interactive-{i}"}}}
              for i in range(workloads)),
            {"name": "rest", "strategy": "balanced", "max_fallbacks": 2},
        ],
    }))
    return path


def test_sixteen_providers_under_three_policies_fit(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """10,848 routes when every ranked order had its own; now three per policy."""
    path = _policy(tmp_path / "wide.yaml", providers=16)

    assert validate(argparse.Namespace(files=[str(path)])) == 0
    assert ": ok (16 providers, 1 models, 3 policies" in capsys.readouterr().out


def test_a_policy_over_the_route_limit_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _policy(tmp_path / "big.yaml", providers=2, models=60, workloads=45)

    assert validate(argparse.Namespace(files=[str(path)])) == 1
    assert "more than 5000" in capsys.readouterr().err


def test_a_translatable_policy_is_ok(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _policy(tmp_path / "small.yaml", providers=4)

    assert validate(argparse.Namespace(files=[str(path)])) == 0
    assert ": ok (4 providers" in capsys.readouterr().out
