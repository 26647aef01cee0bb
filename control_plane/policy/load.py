"""Policy YAML -> validated RoutingConfig, with every problem reported at once.

The file is composed into YAML nodes first, so each value keeps the line it came
from; validation then walks plain values and names every issue as
"<file>:<line>: <key.path>: <message>". Credentials are not resolved here (see
credentials.py): a file must validate on a machine that has no keys.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from dataclasses import fields as dataclass_fields
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from control_plane.policy.model import (
    Credential,
    Failover,
    Gpu,
    HealthCheck,
    Match,
    Model,
    Offering,
    OutlierDetection,
    Policy,
    Price,
    Provider,
    RoutingConfig,
    Strategy,
    Upstream,
    UsageFormat,
)

SCHEMA_VERSION = 1
PROVIDER_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
"""An HTTP header name (RFC 9110 token), after lower-casing."""
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
                       r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?$")
"""A DNS name as urlsplit reports it (lower-cased)."""
_URL_PATH = re.compile(r"^/\S*$")
_MAX_FALLBACKS = 5
_MERGE_TAG = "tag:yaml.org,2002:merge"
_DEFAULT_PORTS = {"http": 80, "https": 443}

KeyPath = tuple[str | int, ...]
T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyIssue:
    """One problem in a policy file, located by key path and line."""

    source: str
    key_path: str
    """Like "providers[0].models[1].price.input"; empty for the document as a whole."""
    line: int
    """1-based; 0 when the file could not be read at all."""
    message: str

    def __str__(self) -> str:
        parts = [self.source]
        if self.line:
            parts[0] += f":{self.line}"
        if self.key_path:
            parts.append(self.key_path)
        parts.append(self.message)
        return ": ".join(parts)


class PolicyError(Exception):
    """A policy file that cannot be used; `issues` lists every problem found."""

    def __init__(self, issues: Iterable[PolicyIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


def default_policy_path() -> Path:
    """The embedded default policy (simulated providers on 127.0.0.1)."""
    return Path(str(resources.files("control_plane.policy").joinpath("default.yaml")))


def load_policy_file(path: str | Path) -> RoutingConfig:
    """Read and validate a policy file; raises PolicyError listing every issue."""
    source = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(
            [PolicyIssue(source=source, key_path="", line=0, message=f"cannot read: {exc}")]
        ) from exc
    return load_policy_text(text, source)


def load_policy_text(text: str, source: str) -> RoutingConfig:
    """Validate policy YAML text; `source` names it in issues and RoutingConfig.source."""
    raw, lines, structural = _compose(text, source)
    check = _Checker(source, lines)
    check.issues.extend(structural)
    config = _routing_config(check, raw, source, _content_version(text))
    if check.issues or config is None:
        raise PolicyError(sorted(check.issues, key=lambda issue: issue.line))
    return config


def _content_version(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --- YAML nodes -> plain values plus the line of every key path -------------------


def _compose(text: str, source: str) -> tuple[Any, dict[KeyPath, int], list[PolicyIssue]]:
    """Plain values, the line of each key path, and structural issues (duplicate keys...)."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                raise PolicyError([PolicyIssue(source=source, key_path="", line=1,
                                               message="the document is empty")])
            builder = _NodeReader(loader, source)
            raw = builder.read(node, ())
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = " ".join(filter(None, [exc.context, exc.problem]))
        raise PolicyError(
            [PolicyIssue(source=source, key_path="", line=line, message=f"invalid YAML: {problem}")]
        ) from exc
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise PolicyError([PolicyIssue(source=source, key_path="", line=line,
                                       message=f"invalid YAML: {exc.reason}")]) from exc
    return raw, builder.lines, builder.issues


class _NodeReader:
    """Turns composed nodes into dicts/lists/scalars, recording each key path's line.

    Duplicate keys (which PyYAML would silently overwrite), non-string keys and
    recursive aliases are issues here, before any schema check.
    """

    def __init__(self, loader: yaml.SafeLoader, source: str) -> None:
        self._loader = loader
        self._source = source
        self._active: set[int] = set()
        self.lines: dict[KeyPath, int] = {}
        self.issues: list[PolicyIssue] = []

    def _issue(self, path: KeyPath, line: int, message: str) -> None:
        self.issues.append(
            PolicyIssue(source=self._source, key_path=_format_key_path(path), line=line,
                        message=message)
        )

    def read(self, node: yaml.Node, path: KeyPath) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            return self._loader.construct_object(node, deep=True)
        if id(node) in self._active:
            self._issue(path, node.start_mark.line + 1, "recursive alias")
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            return [self.read(item, (*path, index)) for index, item in enumerate(node.value)]
        finally:
            self._active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        """Keys inherited through merge keys (<<) first; the mapping's own keys override them,
        as YAML says, and only a repeated own key is a duplicate."""
        own = [(key, value) for key, value in node.value if key.tag != _MERGE_TAG]
        flat = yaml.MappingNode(node.tag, list(node.value), node.start_mark, node.end_mark)
        self._loader.flatten_mapping(flat)
        inherited = flat.value[: len(flat.value) - len(own)]
        out: dict[str, Any] = {}
        for pairs, check_duplicates in ((inherited, False), (own, True)):
            seen: set[str] = set()
            for key_node, value_node in pairs:
                line = key_node.start_mark.line + 1
                key = (self._loader.construct_object(key_node, deep=True)
                       if isinstance(key_node, yaml.ScalarNode) else None)
                if not isinstance(key, str):
                    self._issue(path, line, f"keys must be strings, got {key_node.value!r}")
                    continue
                key_path = (*path, key)
                if check_duplicates and key in seen:
                    self._issue(key_path, line,
                                f"duplicate key (first at line {self.lines[key_path]})")
                    continue
                seen.add(key)
                self.lines[key_path] = line
                out[key] = self.read(value_node, key_path)
        return out


def _format_key_path(path: KeyPath) -> str:
    """("providers", 0, "name") -> "providers[0].name"."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


# --- typed reading of plain values -------------------------------------------------


class _Missing:
    """A required key that is absent (already reported by _Checker.mapping)."""


_MISSING: Any = _Missing()


def _type_name(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string",
             list: "list", dict: "mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class _Checker:
    """Typed readers that record an issue and return None instead of raising.

    Each reader returns None silently for _MISSING, so a missing key is reported
    once (by `mapping`) and never again as a wrong type.
    """

    def __init__(self, source: str, lines: Mapping[KeyPath, int]) -> None:
        self.source = source
        self.lines = lines
        self.issues: list[PolicyIssue] = []

    def line(self, path: KeyPath) -> int:
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path, 1)

    def fail(self, path: KeyPath, message: str) -> None:
        self.issues.append(PolicyIssue(source=self.source, key_path=_format_key_path(path),
                                       line=self.line(path), message=message))

    def typed(self, value: object, path: KeyPath, kind: type[T], expected: str) -> T | None:
        """`value` if it is a `kind` (a boolean is no number); else None, with an issue
        unless the value is _MISSING."""
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
        if value is not _MISSING:
            self.fail(path, f"expected {expected}, got {_type_name(value)}")
        return None

    def mapping(self, value: Any, path: KeyPath, *, required: Iterable[str] = (),
                optional: Iterable[str] = ()) -> dict[str, Any] | None:
        fields: dict[str, Any] | None = self.typed(value, path, dict, "a mapping")
        if fields is None:
            return None
        required = tuple(required)
        allowed = (*required, *optional)
        for key in fields:
            if key not in allowed:
                self.fail((*path, key), f"unknown key; allowed keys: {', '.join(allowed)}")
        for key in required:
            if key not in fields:
                self.fail(path, f"missing required key '{key}'")
        return fields

    def string(self, value: Any, path: KeyPath, *, pattern: re.Pattern[str] | None = None,
               pattern_hint: str = "", allow_empty: bool = False) -> str | None:
        text = self.typed(value, path, str, "a string")
        if text is None:
            return None
        if not text:
            if allow_empty:
                return text
            self.fail(path, "must not be empty")
            return None
        if pattern is not None and not pattern.fullmatch(text):
            self.fail(path, f"{text!r} is not valid: {pattern_hint}")
            return None
        return text

    def number(self, value: Any, path: KeyPath, *, positive: bool = False) -> float | None:
        """A finite number >= 0 (> 0 when `positive`)."""
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        number = self.typed(value, path, float, "a number")
        if number is None:
            return None
        if not math.isfinite(number):
            self.fail(path, f"must be a finite number, got {number}")
            return None
        if number < 0 or (positive and number == 0):
            self.fail(path, f"must be {'> 0' if positive else '>= 0'}, got {number:g}")
            return None
        return number

    def integer(self, value: Any, path: KeyPath, *, minimum: int,
                maximum: int | None = None) -> int | None:
        number = self.typed(value, path, int, "an integer")
        if number is None:
            return None
        if number < minimum or (maximum is not None and number > maximum):
            bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            self.fail(path, f"must be {bounds}, got {number}")
            return None
        return number

    def sequence(self, value: Any, path: KeyPath, *, non_empty: bool = False) -> list[Any] | None:
        items: list[Any] | None = self.typed(value, path, list, "a list")
        if items is None:
            return None
        if non_empty and not items:
            self.fail(path, "must not be empty")
            return None
        return items

    def items(self, value: Any, path: KeyPath, read: Callable[[Any, KeyPath], T | None], *,
              non_empty: bool = False) -> list[T] | None:
        """Reads each list item; None when the list or any item is invalid."""
        raw = self.sequence(value, path, non_empty=non_empty)
        if raw is None:
            return None
        out = [read(item, (*path, index)) for index, item in enumerate(raw)]
        return None if any(item is None for item in out) else [i for i in out if i is not None]

    def unique(self, seen: dict[str, KeyPath], name: str, path: KeyPath, what: str) -> None:
        """Records `name` at `path`; a second occurrence is a duplicate issue."""
        first = seen.setdefault(name, path)
        if first != path:
            self.fail(path, f"duplicate {what} '{name}' (first at line {self.line(first)})")


# --- the schema ---------------------------------------------------------------------

_PROVIDER_HINT = "lower-case letters, digits, '-' or '_', starting with a letter"
_STRATEGIES = ", ".join(strategy.value for strategy in Strategy)
_USAGE_FORMATS = ", ".join(usage_format.value for usage_format in UsageFormat)
_PRICE_KEYS = ("input", "output", "cached_input", "cache_write", "reasoning")
_REPORTED_PRICES: dict[UsageFormat, dict[str, str]] = {
    UsageFormat.OPENAI: {"cached_input": "cached prompt tokens",
                         "reasoning": "reasoning tokens"},
    UsageFormat.ANTHROPIC: {"cached_input": "cache read tokens",
                            "cache_write": "cache creation tokens"},
    UsageFormat.NONE: {},
}
"""Per usage format: the optional prices it makes required, and the token count behind each."""


@dataclass(slots=True, kw_only=True)
class _Names:
    """What later sections resolve names against, filled while earlier ones are read.

    A name is recorded even when the rest of its entry is invalid, so one bad field
    does not cascade into "unknown model" issues elsewhere.
    """

    canonical: dict[str, str]
    """Model name or alias -> canonical model name."""
    first_seen: dict[str, KeyPath]
    """Model name or alias -> where it was declared (names and aliases share one space)."""
    models: dict[str, KeyPath]
    """Canonical model name -> its `name` key path."""
    providers: dict[str, KeyPath]
    policies: dict[str, KeyPath]
    served: set[str]
    """Canonical names of models that some provider offers."""


def _routing_config(check: _Checker, raw: Any, source: str, version: str) -> RoutingConfig | None:
    top = check.mapping(raw, (), required=("version", "providers", "models", "policies"),
                        optional=("failover",))
    if top is None:
        return None
    schema = check.integer(top.get("version", _MISSING), ("version",), minimum=0)
    if schema is not None and schema != SCHEMA_VERSION:
        check.fail(("version",),
                   f"unsupported version {schema}; this router reads version {SCHEMA_VERSION}")
    names = _Names(canonical={}, first_seen={}, models={}, providers={}, policies={},
                   served=set())
    models = check.items(top.get("models", _MISSING), ("models",),
                         lambda item, path: _model(check, item, path, names), non_empty=True)
    providers = check.items(top.get("providers", _MISSING), ("providers",),
                            lambda item, path: _provider(check, item, path, names),
                            non_empty=True)
    if isinstance(top.get("providers"), list):
        for name, path in names.models.items():
            if name not in names.served:
                check.fail(path, f"model '{name}' is served by no provider "
                                 "(no provider lists it under models)")
    policies = check.items(top.get("policies", _MISSING), ("policies",),
                           lambda item, path: _policy(check, item, path, names), non_empty=True)
    if policies is not None:
        _check_catch_all(check, policies)
    failover = _failover(check, top.get("failover", {}), ("failover",))
    if models is None or providers is None:
        return None
    _check_hardware_fit(check, models, providers, names)
    if policies is None or failover is None:
        return None
    return RoutingConfig(providers=tuple(providers), models=tuple(models), failover=failover,
                         policies=tuple(policies), source=source, version=version)


def _model(check: _Checker, raw: Any, path: KeyPath, names: _Names) -> Model | None:
    fields = check.mapping(raw, path, required=("name",),
                           optional=("aliases", "min_gpu_memory_gb", "gpu_types"))
    if fields is None:
        return None
    name = check.string(fields.get("name", _MISSING), (*path, "name"))
    aliases = check.items(fields.get("aliases", []), (*path, "aliases"), check.string)
    if name is not None:
        check.unique(names.first_seen, name, (*path, "name"), "model name or alias")
        names.canonical.setdefault(name, name)
        names.models.setdefault(name, (*path, "name"))
    for index, alias in enumerate(aliases or ()):
        check.unique(names.first_seen, alias, (*path, "aliases", index), "model name or alias")
        if name is not None:
            names.canonical.setdefault(alias, name)
    min_memory = check.number(fields.get("min_gpu_memory_gb", 0), (*path, "min_gpu_memory_gb"))
    gpu_types = check.items(fields.get("gpu_types", []), (*path, "gpu_types"), check.string)
    if gpu_types is not None:
        seen: dict[str, KeyPath] = {}
        for index, gpu_type in enumerate(gpu_types):
            check.unique(seen, gpu_type, (*path, "gpu_types", index), "gpu type")
    if name is None or aliases is None or min_memory is None or gpu_types is None:
        return None
    return Model(name=name, aliases=tuple(aliases), min_gpu_memory_gb=min_memory,
                 gpu_types=tuple(gpu_types))


def _provider(check: _Checker, raw: Any, path: KeyPath, names: _Names) -> Provider | None:
    fields = check.mapping(
        raw, path, required=("name", "base_url", "gpus", "models"),
        optional=("credentials", "max_concurrency", "health_check_path", "usage_format",
                  "health_check", "outlier_detection"),
    )
    if fields is None:
        return None
    name = check.string(fields.get("name", _MISSING), (*path, "name"), pattern=PROVIDER_NAME,
                        pattern_hint=_PROVIDER_HINT)
    if name is not None:
        check.unique(names.providers, name, (*path, "name"), "provider name")
    base_url = check.string(fields.get("base_url", _MISSING), (*path, "base_url"))
    upstream = _upstream(check, base_url, (*path, "base_url")) if base_url is not None else None
    credential = (_credential(check, fields["credentials"], (*path, "credentials"))
                  if "credentials" in fields else None)
    max_concurrency = check.integer(fields.get("max_concurrency", 64),
                                    (*path, "max_concurrency"), minimum=1)
    health_check_path = check.string(fields.get("health_check_path", "/health"),
                                     (*path, "health_check_path"), pattern=_URL_PATH,
                                     pattern_hint="a path starting with '/'")
    usage_format = _usage_format(check, fields.get("usage_format", UsageFormat.OPENAI.value),
                                 (*path, "usage_format"))
    health_check = _positive_integers(check, fields.get("health_check", {}),
                                      (*path, "health_check"), HealthCheck())
    outlier_detection = _positive_integers(check, fields.get("outlier_detection", {}),
                                           (*path, "outlier_detection"), OutlierDetection())
    gpu_seen: dict[str, KeyPath] = {}
    gpus = check.items(fields.get("gpus", _MISSING), (*path, "gpus"),
                       lambda item, item_path: _gpu(check, item, item_path, gpu_seen),
                       non_empty=True)
    offered: dict[str, KeyPath] = {}
    offerings = check.items(
        fields.get("models", _MISSING), (*path, "models"),
        lambda item, item_path: _offering(check, item, item_path, names, gpus, offered,
                                          usage_format),
        non_empty=True,
    )
    if (name is None or base_url is None or upstream is None or max_concurrency is None
            or health_check_path is None or gpus is None or offerings is None
            or usage_format is None or ("credentials" in fields and credential is None)
            or health_check is None or outlier_detection is None):
        return None
    return Provider(name=name, base_url=base_url, upstream=upstream, gpus=tuple(gpus),
                    offerings=tuple(offerings), max_concurrency=max_concurrency,
                    health_check_path=health_check_path, credential=credential,
                    usage_format=usage_format, health_check=health_check,
                    outlier_detection=outlier_detection)


_PERCENT_KEYS = frozenset({"failure_percentage_threshold"})
"""Integer settings that are a percentage (at most 100)."""
Settings = TypeVar("Settings", HealthCheck, OutlierDetection)


def _positive_integers(check: _Checker, raw: Any, path: KeyPath,
                       defaults: Settings) -> Settings | None:
    """A mapping whose keys are `defaults`' fields, each an optional integer >= 1; the keys
    left out keep their defaults."""
    keys = [field.name for field in dataclass_fields(defaults)]
    given = check.mapping(raw, path, optional=keys)
    if given is None:
        return None
    values = {key: check.integer(value, (*path, key), minimum=1,
                                 maximum=100 if key in _PERCENT_KEYS else None)
              for key, value in given.items() if key in keys}
    valid = {key: value for key, value in values.items() if value is not None}
    if len(valid) != len(given):
        return None
    return replace(defaults, **valid)


def _failover(check: _Checker, raw: Any, path: KeyPath) -> Failover | None:
    given = check.mapping(raw, path, optional=("retry_budget_percent", "min_retry_concurrency"))
    if given is None:
        return None
    default = Failover()
    budget = check.number(given.get("retry_budget_percent", default.retry_budget_percent),
                          (*path, "retry_budget_percent"), positive=True)
    if budget is not None and budget > 100:
        check.fail((*path, "retry_budget_percent"), f"must be at most 100, got {budget:g}")
        budget = None
    concurrency = check.integer(given.get("min_retry_concurrency", default.min_retry_concurrency),
                                (*path, "min_retry_concurrency"), minimum=0)
    if budget is None or concurrency is None:
        return None
    return Failover(retry_budget_percent=budget, min_retry_concurrency=concurrency)


def _usage_format(check: _Checker, raw: Any, path: KeyPath) -> UsageFormat | None:
    text = check.string(raw, path)
    if text is None:
        return None
    try:
        return UsageFormat(text)
    except ValueError:
        check.fail(path, f"unknown usage_format '{text}'; one of: {_USAGE_FORMATS}")
        return None


def _upstream(check: _Checker, url: str, path: KeyPath) -> Upstream | None:
    """Splits a base URL into what an Envoy cluster needs; the path is a prefix."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        check.fail(path, f"{url!r} has an invalid port")
        return None
    if parts.scheme not in _DEFAULT_PORTS:
        problem = "must start with http:// or https://"
    elif not parts.hostname or not _valid_host(parts.hostname):
        problem = "has no valid host"
    elif parts.username is not None or parts.password is not None:
        problem = "must not carry credentials (use the provider's credentials key)"
    elif parts.query or parts.fragment:
        problem = "must not have a query or fragment"
    elif port == 0:
        problem = "has an invalid port"
    elif parts.path and not _URL_PATH.fullmatch(parts.path):
        problem = "has an invalid path"
    else:
        return Upstream(scheme=parts.scheme, host=parts.hostname,
                        port=port or _DEFAULT_PORTS[parts.scheme],
                        path_prefix=parts.path.rstrip("/"))
    check.fail(path, f"{url!r} {problem}")
    return None


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return bool(_HOSTNAME.fullmatch(host))
    return True


def _credential(check: _Checker, raw: Any, path: KeyPath) -> Credential | None:
    fields = check.mapping(raw, path, optional=("env", "file", "header", "prefix"))
    if fields is None:
        return None
    sources = [key for key in ("env", "file") if key in fields]
    if len(sources) != 1:
        check.fail(path, "set exactly one of 'env' or 'file'"
                         + (", not both" if sources else ""))
    env = (check.string(fields["env"], (*path, "env"), pattern=_ENV_VAR,
                        pattern_hint="an environment variable name")
           if "env" in fields else None)
    file = check.string(fields["file"], (*path, "file")) if "file" in fields else None
    header = check.string(fields.get("header", "authorization"), (*path, "header"))
    if header is not None:
        header = header.lower()
        if not _HEADER_NAME.fullmatch(header):
            check.fail((*path, "header"), f"{header!r} is not an HTTP header name")
            header = None
    prefix = check.string(fields.get("prefix", "Bearer "), (*path, "prefix"), allow_empty=True)
    if len(sources) != 1 or (env is None and file is None) or header is None or prefix is None:
        return None
    return Credential(env=env, file=file, header=header, prefix=prefix)


def _gpu(check: _Checker, raw: Any, path: KeyPath, seen: dict[str, KeyPath]) -> Gpu | None:
    fields = check.mapping(raw, path, required=("type", "memory_gb"))
    if fields is None:
        return None
    gpu_type = check.string(fields.get("type", _MISSING), (*path, "type"))
    if gpu_type is not None:
        check.unique(seen, gpu_type, (*path, "type"), "gpu type")
    memory = check.number(fields.get("memory_gb", _MISSING), (*path, "memory_gb"), positive=True)
    if gpu_type is None or memory is None:
        return None
    return Gpu(type=gpu_type, memory_gb=memory)


def _offering(check: _Checker, raw: Any, path: KeyPath, names: _Names,
              gpus: list[Gpu] | None, offered: dict[str, KeyPath],
              usage_format: UsageFormat | None) -> Offering | None:
    """One provider's `models` entry; `gpus` is None when the provider's gpus are invalid,
    `usage_format` None when the provider's is."""
    fields = check.mapping(raw, path, required=("name", "price"), optional=("id", "gpu"))
    if fields is None:
        return None
    public = check.string(fields.get("name", _MISSING), (*path, "name"))
    model = _known_model(check, public, (*path, "name"), names)
    if model is not None:
        names.served.add(model)
        check.unique(offered, model, (*path, "name"), "offering of model")
    provider_model_id = check.string(fields.get("id", _MISSING if public is None else public),
                                     (*path, "id"))
    gpu = _offering_gpu(check, fields, path, gpus)
    price = _price(check, fields.get("price", _MISSING), (*path, "price"), usage_format)
    if model is None or provider_model_id is None or gpu is None or price is None:
        return None
    return Offering(model=model, provider_model_id=provider_model_id, gpu=gpu, price=price)


def _offering_gpu(check: _Checker, fields: dict[str, Any], path: KeyPath,
                  gpus: list[Gpu] | None) -> str | None:
    """The named gpu, or the provider's only one when the offering names none."""
    gpu = check.string(fields["gpu"], (*path, "gpu")) if "gpu" in fields else None
    if gpus is None:
        return None
    types = [known.type for known in gpus]
    if "gpu" not in fields:
        if len(types) == 1:
            return types[0]
        check.fail(path, "missing required key 'gpu' (this provider has several gpu types: "
                         f"{', '.join(types)})")
        return None
    if gpu is not None and gpu not in types:
        check.fail((*path, "gpu"),
                   f"unknown gpu '{gpu}'; this provider's gpus: {', '.join(types)}")
        return None
    return gpu


def _price(check: _Checker, raw: Any, path: KeyPath,
           usage_format: UsageFormat | None) -> Price | None:
    """The price sheet; every price the usage format can report must be listed (never a
    silent default), others are optional."""
    fields = check.mapping(raw, path, required=("input", "output"), optional=_PRICE_KEYS[2:])
    if fields is None:
        return None
    if usage_format is not None:
        for key, tokens in _REPORTED_PRICES[usage_format].items():
            if key not in fields:
                check.fail(path, f"missing price '{key}': usage_format '{usage_format.value}' "
                                 f"reports {tokens}; list it (0 if they are free)")
    prices = {key: check.number(fields[key], (*path, key))
              for key in _PRICE_KEYS if key in fields}
    listed = {key: value for key, value in prices.items() if value is not None}
    if len(listed) != len(fields) or not {"input", "output"} <= listed.keys():
        return None
    return Price(**listed)


def _known_model(check: _Checker, name: str | None, path: KeyPath,
                 names: _Names) -> str | None:
    """The canonical name for a model name or alias; an issue when nobody declared it."""
    if name is None:
        return None
    canonical = names.canonical.get(name)
    if canonical is None:
        check.fail(path, f"unknown model '{name}'; known models: {', '.join(names.models)}")
    return canonical


def _policy(check: _Checker, raw: Any, path: KeyPath, names: _Names) -> Policy | None:
    fields = check.mapping(
        raw, path, required=("name",),
        optional=("match", "strategy", "weights", "latency_sla_ms", "cost_ceiling_usd_per_mtok",
                  "max_fallbacks", "per_try_timeout_ms", "providers"),
    )
    if fields is None:
        return None
    name = check.string(fields.get("name", _MISSING), (*path, "name"))
    if name is not None:
        check.unique(names.policies, name, (*path, "name"), "policy name")
    match = _match(check, fields.get("match", {}), (*path, "match"), names)
    strategy = _strategy(check, fields.get("strategy", Strategy.BALANCED.value),
                         (*path, "strategy"))
    weights = _weights(check, fields, path, strategy)
    latency_sla_ms = check.number(fields.get("latency_sla_ms", 0), (*path, "latency_sla_ms"))
    cost_ceiling = check.number(fields.get("cost_ceiling_usd_per_mtok", 0),
                                (*path, "cost_ceiling_usd_per_mtok"))
    per_try_timeout_ms = check.integer(fields.get("per_try_timeout_ms", 60000),
                                       (*path, "per_try_timeout_ms"), minimum=1)
    max_fallbacks = check.integer(fields.get("max_fallbacks", 2), (*path, "max_fallbacks"),
                                  minimum=0, maximum=_MAX_FALLBACKS)
    allowed: dict[str, KeyPath] = {}
    providers = check.items(
        fields.get("providers", []), (*path, "providers"),
        lambda item, item_path: _allowed_provider(check, item, item_path, names, allowed),
    )
    if (name is None or match is None or strategy is None or weights is None
            or latency_sla_ms is None or cost_ceiling is None or max_fallbacks is None
            or per_try_timeout_ms is None or providers is None):
        return None
    return Policy(name=name, match=match, strategy=strategy, cost_weight=weights[0],
                  latency_weight=weights[1], latency_sla_ms=latency_sla_ms,
                  cost_ceiling_usd_per_mtok=cost_ceiling, max_fallbacks=max_fallbacks,
                  per_try_timeout_ms=per_try_timeout_ms, providers=tuple(providers))


def _strategy(check: _Checker, raw: Any, path: KeyPath) -> Strategy | None:
    text = check.string(raw, path)
    if text is None:
        return None
    try:
        return Strategy(text)
    except ValueError:
        check.fail(path, f"unknown strategy '{text}'; one of: {_STRATEGIES}")
        return None


def _weights(check: _Checker, policy: dict[str, Any], path: KeyPath,
             strategy: Strategy | None) -> tuple[float, float] | None:
    """(cost, latency) weights; only a balanced policy may set them."""
    if "weights" not in policy:
        return (0.5, 0.5)
    path = (*path, "weights")
    if strategy is not None and strategy is not Strategy.BALANCED:
        check.fail(path, f"weights apply only to strategy 'balanced', not '{strategy.value}'")
    fields = check.mapping(policy["weights"], path, required=("cost", "latency"))
    if fields is None:
        return None
    cost = check.number(fields.get("cost", _MISSING), (*path, "cost"))
    latency = check.number(fields.get("latency", _MISSING), (*path, "latency"))
    if cost is None or latency is None:
        return None
    if cost == 0 and latency == 0:
        check.fail(path, "cost and latency weights must not both be 0")
        return None
    return (cost, latency)


def _match(check: _Checker, raw: Any, path: KeyPath, names: _Names) -> Match | None:
    fields = check.mapping(raw, path, optional=("path_prefix", "headers", "models"))
    if fields is None:
        return None
    path_prefix = check.string(fields.get("path_prefix", ""), (*path, "path_prefix"),
                               pattern=_URL_PATH, pattern_hint="a path starting with '/'",
                               allow_empty=True)
    headers = _match_headers(check, fields.get("headers", {}), (*path, "headers"))
    seen: dict[str, KeyPath] = {}

    def read_model(item: Any, item_path: KeyPath) -> str | None:
        model = _known_model(check, check.string(item, item_path), item_path, names)
        if model is not None:
            check.unique(seen, model, item_path, "model")
        return model

    models = check.items(fields.get("models", []), (*path, "models"), read_model)
    if path_prefix is None or headers is None or models is None:
        return None
    return Match(path_prefix=path_prefix, headers=headers, models=tuple(models))


def _match_headers(check: _Checker, raw: Any, path: KeyPath) -> tuple[tuple[str, str], ...] | None:
    fields: dict[str, Any] | None = check.typed(raw, path, dict, "a mapping")
    if fields is None:
        return None
    headers: list[tuple[str, str]] = []
    seen: dict[str, KeyPath] = {}
    valid = True
    for name, raw_value in fields.items():
        lower = name.lower()
        value = check.string(raw_value, (*path, name))
        if not _HEADER_NAME.fullmatch(lower):
            check.fail((*path, name), f"{name!r} is not an HTTP header name")
            valid = False
        else:
            check.unique(seen, lower, (*path, name), "header name")
        if value is None:
            valid = False
        else:
            headers.append((lower, value))
    return tuple(headers) if valid else None


def _allowed_provider(check: _Checker, raw: Any, path: KeyPath, names: _Names,
                      seen: dict[str, KeyPath]) -> str | None:
    name = check.string(raw, path)
    if name is None:
        return None
    if name not in names.providers:
        check.fail(path, f"policy names unknown provider '{name}'; known providers: "
                         f"{', '.join(names.providers)}")
        return None
    check.unique(seen, name, path, "provider")
    return name


def _matches_everything(match: Match) -> bool:
    return match.path_prefix in ("", "/") and not match.headers and not match.models


def _check_catch_all(check: _Checker, policies: list[Policy]) -> None:
    """The last policy must match every request, and nothing may follow a catch-all."""
    catch_all = next((i for i, policy in enumerate(policies)
                      if _matches_everything(policy.match)), None)
    if catch_all is None:
        check.fail(("policies",), "no catch-all policy: the last policy must match every "
                                  "request (no match, or an empty one)")
        return
    for index in range(catch_all + 1, len(policies)):
        check.fail(("policies", index, "name"),
                   f"policy '{policies[index].name}' is unreachable: policy "
                   f"'{policies[catch_all].name}' before it matches every request")


def _fits(model: Model, gpu: Gpu) -> bool:
    """Hardware fit as model.Model says: enough memory, and a listed type if any are listed."""
    return gpu.memory_gb >= model.min_gpu_memory_gb and (
        not model.gpu_types or gpu.type in model.gpu_types)


def _check_hardware_fit(check: _Checker, models: list[Model], providers: list[Provider],
                        names: _Names) -> None:
    """Every gpu_types entry exists somewhere, and every model fits some offering's GPU."""
    known_types = {gpu.type for provider in providers for gpu in provider.gpus}
    for index, model in enumerate(models):
        for type_index, gpu_type in enumerate(model.gpu_types):
            if gpu_type not in known_types:
                check.fail(("models", index, "gpu_types", type_index),
                           f"unknown gpu '{gpu_type}'; provider gpus: "
                           f"{', '.join(sorted(known_types))}")
        offered_on = [gpu for provider in providers for offering in provider.offerings
                      if offering.model == model.name
                      for gpu in provider.gpus if gpu.type == offering.gpu]
        if not any(_fits(model, gpu) for gpu in offered_on):
            needs = f">= {model.min_gpu_memory_gb:g} GB" + (
                f" on one of {', '.join(model.gpu_types)}" if model.gpu_types else "")
            check.fail(names.models[model.name],
                       f"no provider offers model '{model.name}' on a GPU that fits it "
                       f"(needs {needs})")
