"""Policy YAML loading: valid files load; every kind of mistake is named by key path and line."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from policy_fixtures import VALID_POLICY, load_valid, write_policy

from control_plane.policy.load import (
    PolicyError,
    PolicyIssue,
    default_policy_path,
    load_policy_file,
    load_policy_text,
)
from control_plane.policy.model import (
    Credential,
    Failover,
    HealthCheck,
    OutlierDetection,
    Price,
    Strategy,
    Upstream,
    UsageFormat,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "policy.yaml"


def mutated(old: str, new: str, text: str = VALID_POLICY) -> str:
    assert text.count(old) == 1, f"fixture must contain {old!r} exactly once"
    return text.replace(old, new)


def line_of(text: str, needle: str) -> int:
    assert text.count(needle) == 1, f"{needle!r} must occur exactly once"
    return text[: text.index(needle)].count("\n") + 1


def issues_of(text: str) -> tuple[PolicyIssue, ...]:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "p.yaml")
    return caught.value.issues


# --- valid files ---------------------------------------------------------------------


def test_default_policy_loads() -> None:
    path = default_policy_path()
    config = load_policy_file(path)
    assert path.name == "default.yaml" and path.is_file()
    assert config.source == str(path)
    assert {p.name for p in config.providers} >= {"lambda", "coreweave", "vast", "runpod"}
    assert config.policies[-1].match.path_prefix == ""


def test_example_policy_loads_every_feature() -> None:
    config = load_policy_file(EXAMPLE)
    credentials = [p.credential for p in config.providers if p.credential is not None]
    assert {c.env is not None for c in credentials} == {True, False}, "env and file credentials"
    assert {p.upstream.scheme for p in config.providers} == {"http", "https"}
    assert {p.strategy for p in config.policies} == set(Strategy)
    assert any(m.gpu_types for m in config.models)
    assert any(p.providers for p in config.policies)


def test_valid_policy_is_read_with_defaults_and_canonical_names(tmp_path: Path) -> None:
    config = load_valid(tmp_path)
    alpha, beta = config.providers
    assert alpha.upstream == Upstream(scheme="https", host="alpha.example.com", port=8443,
                                      path_prefix="/api")
    assert beta.upstream == Upstream(scheme="http", host="127.0.0.1", port=9001, path_prefix="")
    assert alpha.credential == Credential(env="ALPHA_KEY", header="authorization",
                                          prefix="Bearer ")
    assert (alpha.max_concurrency, alpha.health_check_path) == (16, "/ready")
    assert (beta.max_concurrency, beta.health_check_path, beta.credential) == (64, "/health", None)
    assert [(o.model, o.provider_model_id, o.gpu) for o in alpha.offerings] == [
        ("big", "org/big-model", "H100"), ("small", "small-alias", "L4")]
    assert [(o.model, o.provider_model_id, o.gpu) for o in beta.offerings] == [
        ("small", "small", "L4")], "id defaults to the name, gpu to the only gpu"
    assert beta.offerings[0].price.output == 0.0

    batch, fast, default = config.policies
    assert batch.match.headers == (("x-workload", "batch"),)
    assert batch.match.models == ("small",)
    assert (batch.strategy, batch.max_fallbacks, batch.providers) == (Strategy.COST, 1, ("beta",))
    assert (fast.strategy, fast.cost_ceiling_usd_per_mtok, fast.max_fallbacks) == (
        Strategy.LATENCY, 1.5, 2)
    assert (default.cost_weight, default.latency_weight) == (1.0, 3.0)
    assert config.source == str(tmp_path / "policy.yaml")
    assert config.version == hashlib.sha256(VALID_POLICY.encode()).hexdigest()[:16]


def test_usage_format_and_price_sheets_are_read(tmp_path: Path) -> None:
    alpha, beta = load_valid(tmp_path).providers
    assert (alpha.usage_format, beta.usage_format) == (UsageFormat.OPENAI, UsageFormat.NONE), \
        "openai is the default"
    assert alpha.offerings[0].price == Price(input=1.0, output=2.0, cached_input=0.25,
                                             reasoning=2.5)
    assert beta.offerings[0].price == Price(input=0.05, output=0.0), "none: only input, output"


def test_a_format_may_list_prices_it_does_not_report() -> None:
    text = mutated("{input: 0.05, output: 0}", "{input: 0.05, output: 0, cache_write: 0.1}")
    price = load_policy_text(text, "p.yaml").providers[1].offerings[0].price
    assert (price.cache_write, price.cached_input) == (0.1, None)


def test_version_follows_the_content() -> None:
    first = load_policy_text(VALID_POLICY, "a.yaml")
    same = load_policy_text(VALID_POLICY, "b.yaml")
    changed = load_policy_text(mutated("max_fallbacks: 1", "max_fallbacks: 3"), "a.yaml")
    assert first.version == same.version != changed.version


def test_yaml_anchors_and_merge_keys_are_allowed() -> None:
    text = mutated("      - {type: L4, memory_gb: 24}\n    models:\n      - {name: big",
                   "      - &l4 {type: L4, memory_gb: 24}\n    models:\n      - {name: big")
    text = mutated("      - {type: L4, memory_gb: 24}\n    models:\n      - {name: small",
                   "      - {<<: *l4, memory_gb: 32}\n    models:\n      - {name: small", text)
    gpu = load_policy_text(text, "p.yaml").providers[1].gpus[0]
    assert (gpu.type, gpu.memory_gb) == ("L4", 32.0)


# --- every class of error, with its key path and line --------------------------------


@dataclass(frozen=True)
class Case:
    old: str
    new: str
    key_path: str
    at: str
    """Text on the line the issue must point at (in the mutated file)."""
    message: str


CASES = {
    "unknown key": Case(
        "    base_url: http://127.0.0.1:9001\n",
        "    base_url: http://127.0.0.1:9001\n    colour: red\n",
        "providers[1].colour", "colour: red",
        "unknown key; allowed keys: name, base_url, gpus, models, credentials"),
    "unknown top-level key": Case(
        "version: 1\n", "version: 1\nlisteners: []\n", "listeners", "listeners:",
        "allowed keys: version, providers, models, policies"),
    "wrong type": Case("max_concurrency: 16", "max_concurrency: many",
                       "providers[0].max_concurrency", "many", "expected an integer, got string"),
    "boolean is not a number": Case("latency_sla_ms: 5000", "latency_sla_ms: yes",
                                    "policies[0].latency_sla_ms", "latency_sla_ms",
                                    "expected a number, got boolean"),
    "list expected": Case("aliases: [small-alias]", "aliases: small-alias",
                          "models[1].aliases", "aliases:", "expected a list, got string"),
    "missing required": Case("    base_url: http://127.0.0.1:9001\n", "",
                             "providers[1]", "name: beta", "missing required key 'base_url'"),
    "missing price": Case("{name: small, price: {input: 0.05, output: 0}}", "{name: small}",
                          "providers[1].models[0]", "{name: small}",
                          "missing required key 'price'"),
    "duplicate provider": Case("name: beta", "name: alpha", "providers[1].name", "- name: alpha\n"
                               "    base_url: http://", "duplicate provider name 'alpha' "
                               "(first at line 3)"),
    "bad provider name": Case("name: beta", "name: Beta.1", "providers[1].name", "Beta.1",
                              "is not valid: lower-case letters"),
    "negative price": Case("input: 0.05", "input: -0.05", "providers[1].models[0].price.input",
                           "-0.05", "must be >= 0, got -0.05"),
    "url scheme": Case("http://127.0.0.1:9001", "ftp://127.0.0.1:9001", "providers[1].base_url",
                       "ftp://", "must start with http:// or https://"),
    "url without host": Case("http://127.0.0.1:9001", "http://:9001", "providers[1].base_url",
                             "http://:9001", "has no valid host"),
    "url bad port": Case("http://127.0.0.1:9001", "http://127.0.0.1:99999",
                         "providers[1].base_url", "99999", "has an invalid port"),
    "url with userinfo": Case("http://127.0.0.1:9001", "http://me:pw@127.0.0.1:9001",
                              "providers[1].base_url", "me:pw", "must not carry credentials"),
    "unknown gpu": Case("gpu: L4,", "gpu: A10,", "providers[0].models[1].gpu", "A10",
                        "unknown gpu 'A10'; this provider's gpus: H100, L4"),
    "gpu required with several": Case("{name: small-alias, gpu: L4,", "{name: small-alias,",
                                      "providers[0].models[1]", "small-alias,",
                                      "missing required key 'gpu'"),
    "duplicate gpu type": Case("{type: L4, memory_gb: 24}\n    models:\n      - {name: big",
                               "{type: H100, memory_gb: 24}\n    models:\n      - {name: big",
                               "providers[0].gpus[1].type", "{type: H100, memory_gb: 24}",
                               "duplicate gpu type 'H100'"),
    "gpu memory zero": Case("{type: H100, memory_gb: 80}", "{type: H100, memory_gb: 0}",
                            "providers[0].gpus[0].memory_gb", "memory_gb: 0}", "must be > 0"),
    "empty gpus": Case("    gpus:\n      - {type: L4, memory_gb: 24}\n    models:\n"
                       "      - {name: small", "    gpus: []\n    models:\n      - {name: small",
                       "providers[1].gpus", "gpus: []", "must not be empty"),
    "unknown model in offering": Case("{name: small, price", "{name: tiny, price",
                                      "providers[1].models[0].name", "tiny",
                                      "unknown model 'tiny'; known models: big, small"),
    "duplicate offering": Case("{name: small-alias, gpu: L4,", "{name: big, gpu: L4,",
                               "providers[0].models[1].name", "{name: big, gpu: L4",
                               "duplicate offering of model 'big'"),
    "unknown provider in policy": Case("providers: [beta]", "providers: [beta, gamma]",
                                       "policies[0].providers[1]", "gamma",
                                       "policy names unknown provider 'gamma'"),
    "unknown model in match": Case("models: [small-alias]", "models: [huge]",
                                   "policies[0].match.models[0]", "huge", "unknown model 'huge'"),
    "schema version": Case("version: 1", "version: 2", "version", "version: 2",
                           "unsupported version 2"),
    "unknown strategy": Case("strategy: latency", "strategy: fastest", "policies[1].strategy",
                             "fastest", "unknown strategy 'fastest'; one of: cost, latency, "
                             "balanced"),
    "weights need balanced": Case("strategy: balanced", "strategy: cost", "policies[2].weights",
                                  "weights:", "weights apply only to strategy 'balanced'"),
    "weights both zero": Case("{cost: 1, latency: 3}", "{cost: 0, latency: 0}",
                              "policies[2].weights", "weights:", "must not both be 0"),
    "max_fallbacks range": Case("max_fallbacks: 1", "max_fallbacks: 6",
                                "policies[0].max_fallbacks", "max_fallbacks: 6",
                                "must be between 0 and 5, got 6"),
    "duplicate policy": Case("name: fast", "name: batch", "policies[1].name", "- name: batch\n"
                             "    match: {headers: {x-tier", "duplicate policy name 'batch'"),
    "no catch-all": Case("  - name: default\n", "  - name: default\n    match: {models: [big]}\n",
                         "policies", "policies:", "no catch-all policy"),
    "unreachable policy": Case("  - name: default\n", "  - name: all\n  - name: default\n",
                               "policies[3].name", "name: default",
                               "policy 'default' is unreachable: policy 'all' before it"),
    "model nobody serves": Case("models:\n  - name: big\n", "models:\n  - name: orphan\n"
                                "  - name: big\n", "models[0].name", "orphan",
                                "model 'orphan' is served by no provider"),
    "model that fits no gpu": Case("min_gpu_memory_gb: 80", "min_gpu_memory_gb: 100",
                                   "models[0].name", "  - name: big\n",
                                   "no provider offers model 'big' on a GPU that fits it"),
    "unknown gpu type in model": Case("gpu_types: [H100]", "gpu_types: [H100, B300]",
                                      "models[0].gpu_types[1]", "B300", "unknown gpu 'B300'"),
    "alias collides with a name": Case("aliases: [small-alias]", "aliases: [small-alias, big]",
                                       "models[1].aliases[1]", "aliases:",
                                       "duplicate model name or alias 'big' (first at line 24)"),
    "negative memory floor": Case("min_gpu_memory_gb: 16", "min_gpu_memory_gb: -1",
                                  "models[1].min_gpu_memory_gb", "-1", "must be >= 0"),
    "credentials env and file": Case("      env: ALPHA_KEY\n",
                                     "      env: ALPHA_KEY\n      file: /run/key\n",
                                     "providers[0].credentials", "credentials:",
                                     "set exactly one of 'env' or 'file', not both"),
    "credentials neither": Case("      env: ALPHA_KEY\n", "      header: x-api-key\n",
                                "providers[0].credentials", "credentials:",
                                "set exactly one of 'env' or 'file'"),
    "bad env var name": Case("env: ALPHA_KEY", "env: ALPHA-KEY", "providers[0].credentials.env",
                             "ALPHA-KEY", "an environment variable name"),
    "bad credential header": Case("      env: ALPHA_KEY\n",
                                  "      env: ALPHA_KEY\n      header: 'x api'\n",
                                  "providers[0].credentials.header", "x api",
                                  "is not an HTTP header name"),
    "health check path": Case("health_check_path: /ready", "health_check_path: ready",
                              "providers[0].health_check_path", "ready",
                              "a path starting with '/'"),
    "match path prefix": Case("path_prefix: /v1/batch", "path_prefix: v1/batch",
                              "policies[0].match.path_prefix", "v1/batch",
                              "a path starting with '/'"),
    "header names are case-insensitive": Case("{X-Workload: batch}", "{X-Workload: batch, "
                                              "x-workload: bulk}",
                                              "policies[0].match.headers.x-workload", "bulk",
                                              "duplicate header name 'x-workload'"),
    "header value must be a string": Case("{x-tier: gold}", "{x-tier: 1}",
                                          "policies[1].match.headers.x-tier", "x-tier: 1",
                                          "expected a string, got integer"),
    "duplicate yaml key": Case("    max_concurrency: 16\n",
                               "    max_concurrency: 16\n    max_concurrency: 8\n",
                               "providers[0].max_concurrency", "max_concurrency: 8",
                               "duplicate key (first at line 7)"),
    "yaml syntax error": Case("strategy: cost", "strategy: [cost", "", "latency_sla_ms: 5000",
                              "invalid YAML"),
    "unknown usage_format": Case("    usage_format: none\n", "    usage_format: json\n",
                                 "providers[1].usage_format", "usage_format: json",
                                 "unknown usage_format 'json'; one of: openai, anthropic, none"),
    "openai format needs the cached input price": Case(
        "cached_input: 0.02, reasoning: 0.2}", "reasoning: 0.2}", "providers[0].models[1].price",
        "{name: small-alias", "missing price 'cached_input': usage_format 'openai' reports cached "
        "prompt tokens"),
    "openai format needs the reasoning price": Case(
        "cached_input: 0.02, reasoning: 0.2}", "cached_input: 0.02}",
        "providers[0].models[1].price", "{name: small-alias",
        "missing price 'reasoning': usage_format 'openai' reports reasoning tokens"),
    "anthropic format needs the cache write price": Case(
        "    usage_format: none\n", "    usage_format: anthropic\n",
        "providers[1].models[0].price", "{name: small, price",
        "missing price 'cache_write': usage_format 'anthropic' reports cache creation tokens"),
    "unknown price key": Case("{input: 0.05, output: 0}", "{input: 0.05, output: 0, batch: 0.01}",
                              "providers[1].models[0].price.batch", "batch: 0.01",
                              "unknown key; allowed keys: input, output, cached_input, "
                              "cache_write, reasoning"),
    "negative cached input price": Case("cached_input: 0.25", "cached_input: -0.25",
                                        "providers[0].models[0].price.cached_input", "-0.25",
                                        "must be >= 0, got -0.25"),
    "empty list": Case("policies:\n  - name: batch", "policies: []\nold_policies:\n  - name: batch",
                       "policies", "policies: []", "must not be empty"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_error_names_key_path_and_line(case: Case) -> None:
    text = mutated(case.old, case.new)
    issues = issues_of(text)
    wanted = [issue for issue in issues
              if issue.key_path == case.key_path and case.message in issue.message]
    assert wanted, f"no issue at {case.key_path!r} with {case.message!r} in {issues}"
    assert wanted[0].line == line_of(text, case.at)
    assert wanted[0].source == "p.yaml"


def test_all_issues_are_collected_and_formatted_one_per_line() -> None:
    text = VALID_POLICY
    for name in ("negative price", "unknown gpu", "unknown strategy", "bad env var name",
                 "unknown provider in policy"):
        case = CASES[name]
        text = mutated(case.old, case.new, text)
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "p.yaml")
    lines = str(caught.value).splitlines()
    assert len(lines) == len(caught.value.issues) == 5
    assert lines == sorted(lines, key=lambda line: int(line.split(":")[1])), "ordered by line"
    price_line = line_of(text, "-0.05")
    assert f"p.yaml:{price_line}: providers[1].models[0].price.input: must be >= 0, got -0.05" \
        in lines


def test_missing_model_does_not_cascade_into_other_errors() -> None:
    issues = issues_of(mutated("min_gpu_memory_gb: 16", "min_gpu_memory_gb: lots"))
    assert [i.key_path for i in issues] == ["models[1].min_gpu_memory_gb"]


@pytest.mark.parametrize(("text", "message"), [
    ("", "the document is empty"),
    ("- 1\n", "expected a mapping, got list"),
    ("version: 1\n\x07\n", "invalid YAML"),
])
def test_degenerate_documents(text: str, message: str) -> None:
    issues = issues_of(text)
    assert message in issues[0].message


def test_unreadable_file_is_a_policy_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(PolicyError) as caught:
        load_policy_file(missing)
    assert str(caught.value).startswith(f"{missing}: cannot read:")


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = write_policy(tmp_path, mutated("input: 0.05", "input: -1"))
    with pytest.raises(PolicyError) as caught:
        load_policy_file(path)
    assert str(caught.value).startswith(f"{path}:")


def test_example_policy_shows_every_usage_format() -> None:
    config = load_policy_file(EXAMPLE)
    assert {p.usage_format for p in config.providers} == set(UsageFormat)


# --- failover settings (issue 3) -------------------------------------------------------

FAILOVER_SETTINGS = (
    ("version: 1\n",
     "version: 1\nfailover: {max_retries_in_flight: 500}\n"),
    ("    health_check_path: /ready\n",
     ("    health_check_path: /ready\n"
      "    health_check: {interval_ms: 1500, timeout_ms: 700}\n"
      "    outlier_detection: {consecutive_5xx: 2, failure_percentage_threshold: 100,\n"
      "                        base_ejection_time_ms: 30000}\n")),
    ("    max_fallbacks: 1\n", "    max_fallbacks: 1\n    per_try_timeout_ms: 2500\n"),
)


def test_failover_settings_are_read_and_the_rest_keep_their_defaults() -> None:
    text = VALID_POLICY
    for old, new in FAILOVER_SETTINGS:
        text = mutated(old, new, text)
    config = load_policy_text(text, "p.yaml")
    assert config.failover == Failover(max_retries_in_flight=500)
    alpha, beta = config.providers
    assert alpha.health_check == HealthCheck(interval_ms=1500, timeout_ms=700)
    assert alpha.outlier_detection == OutlierDetection(
        consecutive_5xx=2, failure_percentage_threshold=100, base_ejection_time_ms=30000
    )
    assert (beta.health_check, beta.outlier_detection) == (HealthCheck(), OutlierDetection())
    assert [p.per_try_timeout_ms for p in config.policies] == [2500, 60000, 60000]


def test_failover_settings_default_when_absent() -> None:
    config = load_policy_text(VALID_POLICY, "p.yaml")
    assert config.failover == Failover()


FAILOVER_CASES = {
    "no retries in flight": Case(
        "version: 1\n", "version: 1\nfailover:\n  max_retries_in_flight: 0\n",
        "failover.max_retries_in_flight", "max_retries_in_flight", "must be >= 1, got 0"),
    "fractional retries in flight": Case(
        "version: 1\n", "version: 1\nfailover:\n  max_retries_in_flight: 2.5\n",
        "failover.max_retries_in_flight", "max_retries_in_flight",
        "expected an integer, got number"),
    "retry budget, replaced": Case(
        "version: 1\n", "version: 1\nfailover:\n  retry_budget_percent: 25\n",
        "failover.retry_budget_percent", "retry_budget_percent",
        "no longer read, failover.max_retries_in_flight replaced it: Envoy's retry budget"),
    "min retry concurrency, replaced": Case(
        "version: 1\n", "version: 1\nfailover:\n  min_retry_concurrency: 3\n",
        "failover.min_retry_concurrency", "min_retry_concurrency",
        "no longer read, failover.max_retries_in_flight replaced it"),
    "unknown failover key": Case(
        "version: 1\n", "version: 1\nfailover:\n  retries: 3\n",
        "failover.retries", "retries: 3", "unknown key; allowed keys: max_retries_in_flight"),
    "zero health-check interval": Case(
        "    health_check_path: /ready\n",
        "    health_check_path: /ready\n    health_check:\n      interval_ms: 0\n",
        "providers[0].health_check.interval_ms", "interval_ms: 0", "must be >= 1, got 0"),
    "unknown health-check key": Case(
        "    health_check_path: /ready\n",
        "    health_check_path: /ready\n    health_check:\n      path: /x\n",
        "providers[0].health_check.path", "path: /x",
        "allowed keys: interval_ms, timeout_ms, unhealthy_threshold, healthy_threshold"),
    "failure percentage above 100": Case(
        "    health_check_path: /ready\n",
        "    health_check_path: /ready\n    outlier_detection:\n"
        "      failure_percentage_threshold: 101\n",
        "providers[0].outlier_detection.failure_percentage_threshold", "threshold: 101",
        "must be between 1 and 100, got 101"),
    "fractional ejection time": Case(
        "    health_check_path: /ready\n",
        "    health_check_path: /ready\n    outlier_detection:\n"
        "      base_ejection_time_ms: 1.5\n",
        "providers[0].outlier_detection.base_ejection_time_ms", "time_ms: 1.5",
        "expected an integer, got number"),
    "zero per-try timeout": Case(
        "    max_fallbacks: 1\n", "    max_fallbacks: 1\n    per_try_timeout_ms: 0\n",
        "policies[0].per_try_timeout_ms", "per_try_timeout_ms", "must be >= 1, got 0"),
}


@pytest.mark.parametrize("case", FAILOVER_CASES.values(), ids=FAILOVER_CASES.keys())
def test_failover_setting_errors_name_key_path_and_line(case: Case) -> None:
    test_error_names_key_path_and_line(case)


def test_replaced_failover_keys_are_reported_once_each_not_as_unknown_keys() -> None:
    text = mutated("version: 1\n", "version: 1\nfailover:\n  retry_budget_percent: 25\n"
                                    "  min_retry_concurrency: 3\n  max_retries_in_flight: 9\n")
    issues = issues_of(text)
    assert [(issue.key_path, issue.line) for issue in issues] == [
        ("failover.retry_budget_percent", line_of(text, "retry_budget_percent")),
        ("failover.min_retry_concurrency", line_of(text, "min_retry_concurrency")),
    ]
    assert all("max_retries_in_flight replaced it" in issue.message for issue in issues)


def test_example_policy_documents_the_failover_settings() -> None:
    config = load_policy_file(EXAMPLE)
    assert config.failover != Failover()
    assert any(p.health_check != HealthCheck() for p in config.providers)
    assert any(p.outlier_detection != OutlierDetection() for p in config.providers)
    assert any(p.per_try_timeout_ms != 60000 for p in config.policies)
