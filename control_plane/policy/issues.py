"""Where a policy problem is (key path and line), and the error that carries every one found."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

KeyPath = tuple[str | int, ...]
"""("providers", 0, "name"): a value's place in the document."""


def format_key_path(path: KeyPath) -> str:
    """("providers", 0, "name") -> "providers[0].name"."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


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
