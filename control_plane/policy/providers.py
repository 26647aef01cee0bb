"""The providers section: base URL, credentials, GPUs, offerings and their prices, and the
per-provider health check, outlier detection and concurrency settings."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import fields as dataclass_fields
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

from control_plane.policy.checker import HEADER_NAME, MISSING, URL_PATH, Checker
from control_plane.policy.issues import KeyPath
from control_plane.policy.model import (
    Credential,
    Gpu,
    HealthCheck,
    Offering,
    OutlierDetection,
    Price,
    Provider,
    Upstream,
    UsageFormat,
)
from control_plane.policy.names import Names, known_model

PROVIDER_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
                       r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?$")
"""A DNS name as urlsplit reports it (lower-cased)."""
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PROVIDER_HINT = "lower-case letters, digits, '-' or '_', starting with a letter"
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


def read_provider(check: Checker, raw: Any, path: KeyPath, names: Names) -> Provider | None:
    fields = check.mapping(
        raw, path, required=("name", "base_url", "gpus", "models"),
        optional=("credentials", "max_concurrency", "health_check_path", "usage_format",
                  "health_check", "outlier_detection"),
    )
    if fields is None:
        return None
    name = check.string(fields.get("name", MISSING), (*path, "name"), pattern=PROVIDER_NAME,
                        pattern_hint=_PROVIDER_HINT)
    if name is not None:
        check.unique(names.providers, name, (*path, "name"), "provider name")
    base_url = check.string(fields.get("base_url", MISSING), (*path, "base_url"))
    upstream = _upstream(check, base_url, (*path, "base_url")) if base_url is not None else None
    credential = (_credential(check, fields["credentials"], (*path, "credentials"))
                  if "credentials" in fields else None)
    max_concurrency = check.integer(fields.get("max_concurrency", 64),
                                    (*path, "max_concurrency"), minimum=1)
    health_check_path = check.string(fields.get("health_check_path", "/health"),
                                     (*path, "health_check_path"), pattern=URL_PATH,
                                     pattern_hint="a path starting with '/'")
    usage_format = _usage_format(check, fields.get("usage_format", UsageFormat.OPENAI.value),
                                 (*path, "usage_format"))
    health_check = _positive_integers(check, fields.get("health_check", {}),
                                      (*path, "health_check"), HealthCheck())
    outlier_detection = _positive_integers(check, fields.get("outlier_detection", {}),
                                           (*path, "outlier_detection"), OutlierDetection())
    gpu_seen: dict[str, KeyPath] = {}
    gpus = check.items(fields.get("gpus", MISSING), (*path, "gpus"),
                       lambda item, item_path: _gpu(check, item, item_path, gpu_seen),
                       non_empty=True)
    offered: dict[str, KeyPath] = {}
    offerings = check.items(
        fields.get("models", MISSING), (*path, "models"),
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


def _positive_integers(check: Checker, raw: Any, path: KeyPath,
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


def _usage_format(check: Checker, raw: Any, path: KeyPath) -> UsageFormat | None:
    text = check.string(raw, path)
    if text is None:
        return None
    try:
        return UsageFormat(text)
    except ValueError:
        check.fail(path, f"unknown usage_format '{text}'; one of: {_USAGE_FORMATS}")
        return None


def _upstream(check: Checker, url: str, path: KeyPath) -> Upstream | None:
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
    elif parts.path and not URL_PATH.fullmatch(parts.path):
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


def _credential(check: Checker, raw: Any, path: KeyPath) -> Credential | None:
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
        if not HEADER_NAME.fullmatch(header):
            check.fail((*path, "header"), f"{header!r} is not an HTTP header name")
            header = None
    prefix = check.string(fields.get("prefix", "Bearer "), (*path, "prefix"), allow_empty=True)
    if len(sources) != 1 or (env is None and file is None) or header is None or prefix is None:
        return None
    return Credential(env=env, file=file, header=header, prefix=prefix)


def _gpu(check: Checker, raw: Any, path: KeyPath, seen: dict[str, KeyPath]) -> Gpu | None:
    fields = check.mapping(raw, path, required=("type", "memory_gb"))
    if fields is None:
        return None
    gpu_type = check.string(fields.get("type", MISSING), (*path, "type"))
    if gpu_type is not None:
        check.unique(seen, gpu_type, (*path, "type"), "gpu type")
    memory = check.number(fields.get("memory_gb", MISSING), (*path, "memory_gb"), positive=True)
    if gpu_type is None or memory is None:
        return None
    return Gpu(type=gpu_type, memory_gb=memory)


def _offering(check: Checker, raw: Any, path: KeyPath, names: Names,
              gpus: list[Gpu] | None, offered: dict[str, KeyPath],
              usage_format: UsageFormat | None) -> Offering | None:
    """One provider's `models` entry; `gpus` is None when the provider's gpus are invalid,
    `usage_format` None when the provider's is."""
    fields = check.mapping(raw, path, required=("name", "price"), optional=("id", "gpu"))
    if fields is None:
        return None
    public = check.string(fields.get("name", MISSING), (*path, "name"))
    model = known_model(check, public, (*path, "name"), names)
    if model is not None:
        names.served.add(model)
        check.unique(offered, model, (*path, "name"), "offering of model")
    provider_model_id = check.string(fields.get("id", MISSING if public is None else public),
                                     (*path, "id"))
    gpu = _offering_gpu(check, fields, path, gpus)
    price = _price(check, fields.get("price", MISSING), (*path, "price"), usage_format)
    if model is None or provider_model_id is None or gpu is None or price is None:
        return None
    return Offering(model=model, provider_model_id=provider_model_id, gpu=gpu, price=price)


def _offering_gpu(check: Checker, fields: dict[str, Any], path: KeyPath,
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


def _price(check: Checker, raw: Any, path: KeyPath,
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
