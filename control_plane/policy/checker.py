"""Typed readers of plain YAML values that record every problem as a PolicyIssue.

Validation reports all issues at once, so readers never raise: each returns None and records why.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from control_plane.policy.issues import KeyPath, PolicyIssue, format_key_path

T = TypeVar("T")
HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
"""An HTTP header name (RFC 9110 token), after lower-casing."""
URL_PATH = re.compile(r"^/\S*$")


class _Missing:
    """A required key that is absent (already reported by Checker.mapping)."""


MISSING: Any = _Missing()


def _type_name(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string",
             list: "list", dict: "mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class Checker:
    """Typed readers that record an issue and return None instead of raising.

    Each reader returns None silently for MISSING, so a missing key is reported
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
        self.issues.append(PolicyIssue(source=self.source, key_path=format_key_path(path),
                                       line=self.line(path), message=message))

    def typed(self, value: object, path: KeyPath, kind: type[T], expected: str) -> T | None:
        """`value` if it is a `kind` (a boolean is no number); else None, with an issue
        unless the value is MISSING."""
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
        if value is not MISSING:
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
