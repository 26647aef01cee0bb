"""Policy YAML composed into plain values, keeping the line of every key path.

PyYAML's own loader would silently overwrite duplicate keys and forget lines; composing the
nodes ourselves makes both an issue with a location.
"""

from __future__ import annotations

from typing import Any

import yaml

from control_plane.policy.issues import KeyPath, PolicyError, PolicyIssue, format_key_path

_MERGE_TAG = "tag:yaml.org,2002:merge"


def compose(text: str, source: str) -> tuple[Any, dict[KeyPath, int], list[PolicyIssue]]:
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
            PolicyIssue(source=self._source, key_path=format_key_path(path), line=line,
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
