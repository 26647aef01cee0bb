"""A small valid policy that exercises every schema feature, for the policy tests."""

from __future__ import annotations

from pathlib import Path

from control_plane.policy.load import load_policy_file
from control_plane.policy.model import RoutingConfig

VALID_POLICY = """\
version: 1
providers:
  - name: alpha
    base_url: https://alpha.example.com:8443/api/
    credentials:
      env: ALPHA_KEY
    max_concurrency: 16
    health_check_path: /ready
    gpus:
      - {type: H100, memory_gb: 80}
      - {type: L4, memory_gb: 24}
    models:
      - {name: big, id: org/big-model, gpu: H100, price: {input: 1.0, output: 2.0, cached_input: 0.25,
                                                       reasoning: 2.5}}
      - {name: small-alias, gpu: L4, price: {input: 0.1, output: 0.2, cached_input: 0.02, reasoning: 0.2}}
  - name: beta
    base_url: http://127.0.0.1:9001
    usage_format: none
    gpus:
      - {type: L4, memory_gb: 24}
    models:
      - {name: small, price: {input: 0.05, output: 0}}
models:
  - name: big
    min_gpu_memory_gb: 80
    gpu_types: [H100]
  - name: small
    aliases: [small-alias]
    min_gpu_memory_gb: 16
policies:
  - name: batch
    match: {path_prefix: /v1/batch, headers: {X-Workload: batch}, models: [small-alias]}
    strategy: cost
    latency_sla_ms: 5000
    max_fallbacks: 1
    providers: [beta]
  - name: fast
    match: {headers: {x-tier: gold}}
    strategy: latency
    cost_ceiling_usd_per_mtok: 1.5
  - name: default
    strategy: balanced
    weights: {cost: 1, latency: 3}
"""


def write_policy(directory: Path, text: str = VALID_POLICY, name: str = "policy.yaml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def load_valid(directory: Path, text: str = VALID_POLICY) -> RoutingConfig:
    """VALID_POLICY (or `text`) loaded from a real file in `directory`."""
    return load_policy_file(write_policy(directory, text))
