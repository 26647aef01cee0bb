"""Provider API keys, read from where the policy says (env var or file), never from the policy.

Resolution is separate from loading so a policy validates on a machine without keys;
the control plane resolves when it builds SDS secrets. No secret value ever appears
in an exception, a log line or a repr produced here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from control_plane.policy.model import Credential, RoutingConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialProblem:
    provider: str
    origin: str
    """Where the key was looked for: "env FOO" or "file /path"."""
    reason: str

    def __str__(self) -> str:
        return f"provider '{self.provider}': credential from {self.origin}: {self.reason}"


class CredentialError(Exception):
    """One or more providers' keys could not be read; `problems` names each one."""

    def __init__(self, problems: Iterable[CredentialProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


def resolve_credentials(
    config: RoutingConfig, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Provider name -> secret, for every provider with credentials.

    A relative `file` is relative to the policy file's directory; `environ`
    defaults to os.environ. Raises CredentialError listing every provider whose
    key is missing, unreadable, empty or not a single line.
    """
    env = os.environ if environ is None else environ
    base_dir = Path(config.source).parent
    secrets: dict[str, str] = {}
    problems: list[CredentialProblem] = []
    for provider in config.providers:
        if provider.credential is None:
            continue
        origin = _origin(provider.credential, base_dir)
        try:
            secrets[provider.name] = _checked(_read(provider.credential, env, base_dir))
        except _Unusable as exc:
            problems.append(CredentialProblem(provider=provider.name, origin=origin,
                                              reason=str(exc)))
    if problems:
        raise CredentialError(problems)
    return secrets


def credential_files(config: RoutingConfig) -> list[Path]:
    """The key files the policy names (watched: a changed file is rolled out like the policy)."""
    base_dir = Path(config.source).parent
    return [
        _file_path(provider.credential, base_dir)
        for provider in config.providers
        if provider.credential is not None and provider.credential.env is None
    ]


class _Unusable(Exception):
    """Why a key cannot be used; its message never contains the key."""


def _file_path(credential: Credential, base_dir: Path) -> Path:
    return base_dir / Path(credential.file or "").expanduser()


def _origin(credential: Credential, base_dir: Path) -> str:
    if credential.env is not None:
        return f"env {credential.env}"
    return f"file {_file_path(credential, base_dir)}"


def _read(credential: Credential, environ: Mapping[str, str], base_dir: Path) -> str:
    if credential.env is not None:
        value = environ.get(credential.env)
        if value is None:
            raise _Unusable("environment variable not set")
        return value.strip()
    try:
        return _file_path(credential, base_dir).read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise _Unusable("file is not UTF-8 text") from None
    except OSError as exc:
        raise _Unusable(f"cannot read: {exc.strerror or type(exc).__name__}") from None


def _checked(value: str) -> str:
    """The value, if it can go into an HTTP header as is."""
    if not value:
        raise _Unusable("empty")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        raise _Unusable("contains control characters or several lines")
    return value
