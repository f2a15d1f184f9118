"""The machinery the section readers share: Reader walks composed YAML nodes, Section reads one
mapping against its keys, and every problem found is collected with its location and line.

It walks the composed nodes (not the constructed dicts) so that every problem carries a line,
duplicate keys are seen, merge keys (<<) apply, and one pass collects everything wrong.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import yaml

from balancer.config import values as v
from balancer.config.errors import Problem, reason

_MERGE_TAG = "tag:yaml.org,2002:merge"

ABSENT: Any = object()  # a key not given (or given as null): the dataclass default applies


def join(loc: str, key: str) -> str:
    return f"{loc}.{key}" if loc else key


def line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None and node.start_mark else None


def is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def unreadable(path: str) -> str | None:
    """Why `path` cannot be read as a file, or None when it can."""
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        return e.strerror or str(e)


def mapping_get(node: yaml.Node | None, key: str | None) -> yaml.Node | None:
    """The value node of `key` in a mapping node, for cross-checks that point at a line."""
    if isinstance(node, yaml.MappingNode):
        for k, value in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return value
    return None


def sequence_item(node: yaml.Node | None, index: int) -> yaml.Node | None:
    if isinstance(node, yaml.SequenceNode) and 0 <= index < len(node.value):
        return node.value[index]
    return None


def mapping_has(node: yaml.Node | None, key: str) -> bool:
    return mapping_get(node, key) is not None


class Reader:
    """Walks one document: turns nodes into values through converters, collecting problems."""

    def __init__(self, source: str, base_dir: str | None) -> None:
        self.source = source
        self.base_dir = base_dir
        self.problems: list[Problem] = []
        # one constructor turns scalar nodes into Python values with the safe YAML 1.1 rules
        self.constructor = yaml.SafeLoader("")
        self._strategies: list[str] | None = None

    # -- reporting and node access --------------------------------------------------------

    def problem(self, loc: str, message: str, where: yaml.Node | int | None = None) -> None:
        at = where if isinstance(where, int) or where is None else line(where)
        self.problems.append(Problem(loc, message, at, self.source))

    def checkpoint(self) -> int:
        return len(self.problems)

    def clean_since(self, mark: int) -> bool:
        return len(self.problems) == mark

    def construct(self, node: yaml.Node) -> object:
        try:
            return self.constructor.construct_object(node)
        except Exception:
            # a failed node stays marked "in construction"; clear it so that a reuse through an
            # alias reports the same error again instead of a bogus "recursive node"
            self.constructor.recursive_objects.pop(node, None)
            raise

    def scalar(self, node: yaml.Node, loc: str, convert: Callable[[object], Any]) -> Any:
        if isinstance(node, yaml.MappingNode):
            value: object = v.Collection("a mapping")
        elif isinstance(node, yaml.SequenceNode):
            value = v.Collection("a list")
        else:
            try:
                value = self.construct(node)
            except Exception as e:
                # broad on purpose: on odd tags and values (`!!int x`, `2001-13-45`) PyYAML
                # raises ValueError, TypeError and others besides its own errors
                self.problem(loc, f"invalid value {node.value!r}: {reason(e)}", node)
                return ABSENT
        try:
            return convert(value)
        except ValueError as e:
            self.problem(loc, str(e), node)
            return ABSENT

    def pairs(
        self, node: yaml.MappingNode, loc: str, seen: set[int] | None = None
    ) -> list[tuple[yaml.Node, yaml.Node]]:
        """The (key, value) nodes of a mapping with YAML merge keys (<<) applied."""
        seen = (seen or set()) | {id(node)}
        explicit: list[tuple[yaml.Node, yaml.Node]] = []
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == _MERGE_TAG):
                explicit.append((key_node, value_node))
                continue
            sources = (
                value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            )
            for src in sources:
                if not isinstance(src, yaml.MappingNode):
                    self.problem(
                        join(loc, "<<"), "a merge key needs a mapping or a list of mappings", src
                    )
                elif id(src) in seen:
                    self.problem(join(loc, "<<"), "a mapping cannot merge itself", src)
                else:
                    merged.extend(self.pairs(src, loc, seen))
        # explicit keys override merged ones, and an earlier merged mapping wins over a later one
        taken = {k.value for k, _ in explicit if isinstance(k, yaml.ScalarNode)}
        result = list(explicit)
        for key_node, value_node in merged:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key not in taken:
                taken.add(key)
                result.append((key_node, value_node))
        return result

    def entries(
        self, node: yaml.Node, loc: str, what: str
    ) -> list[tuple[str, yaml.Node, yaml.Node]] | None:
        """(key, key node, value node) of a mapping with string keys; duplicates reported."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(loc, f"expected {what}, got {self.kind(node)}", node)
            return None
        found: list[tuple[str, yaml.Node, yaml.Node]] = []
        first_seen: dict[str, yaml.Node] = {}
        for key_node, value_node in self.pairs(node, loc):
            key = self.scalar(key_node, loc, self._key)
            if key is ABSENT:
                continue
            if key in first_seen:
                self.problem(
                    join(loc, key),
                    f"duplicate key '{key}' (first at line {line(first_seen[key])});"
                    " YAML would silently keep only the last one",
                    key_node,
                )
                continue
            first_seen[key] = key_node
            found.append((key, key_node, value_node))
        return found

    @staticmethod
    def _key(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError(f"a key must be a string, got {v.kind(value)}")
        return value

    def mapping(
        self, node: yaml.Node, loc: str, keys: Iterable[str]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        known = tuple(keys)
        found = self.entries(node, loc, "a mapping")
        if found is None:
            return None
        result: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, key_node, value_node in found:
            if key not in known:
                self.problem(
                    join(loc, key), f"unknown key '{key}'{v.suggest(key, known)}", key_node
                )
            else:
                result[key] = (key_node, value_node)
        return result

    def sequence(self, node: yaml.Node | None, loc: str, what: str) -> list[yaml.Node] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(loc, f"expected a list of {what}, got {self.kind(node)}", node)
            return None
        return list(node.value)

    def kind(self, node: yaml.Node | None) -> str:
        if node is None:
            return "nothing"
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        try:
            return v.kind(self.construct(node))
        except Exception:  # broad: see scalar()
            return "an invalid value"

    # -- converters that need the file's directory --------------------------------------------

    def path(self, value: object) -> str:
        """A file path, made absolute against the config file's directory."""
        text = os.path.expanduser(v.string(value))
        if not os.path.isabs(text):
            text = os.path.join(self.base_dir or os.getcwd(), text)
        return os.path.normpath(text)

    def readable_path(self, value: object) -> str:
        path = self.path(value)
        why = unreadable(path)
        if why is not None:
            raise ValueError(f"cannot read {path}: {why}")
        return path

    def path_in_existing_dir(self, value: object) -> str:
        path = self.path(value)
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            raise ValueError(f"directory {directory} does not exist")
        return path

    def strategies(self) -> list[str]:
        if self._strategies is None:
            # imported here, not at the top, so that a strategy module may import this one
            from balancer.strategies import registered_names

            self._strategies = registered_names()
        return self._strategies


class Section:
    """A YAML mapping read against a fixed set of keys."""

    def __init__(self, r: Reader, node: yaml.Node | None, loc: str, keys: Iterable[str]) -> None:
        self.reader = r
        self.node = node
        self.loc = loc
        self.entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        self.values: dict[str, Any] = {}  # converted values that passed, for cross-checks
        self.ok = True
        if node is None or is_null(node):
            return
        entries = r.mapping(node, loc, keys)
        if entries is None:
            self.ok = False
        else:
            self.entries = entries

    def at(self, key: str) -> str:
        return join(self.loc, key)

    def has(self, key: str) -> bool:
        return key in self.entries and not is_null(self.entries[key][1])

    def value_node(self, key: str) -> yaml.Node | None:
        entry = self.entries.get(key)
        return entry[1] if entry else None

    def line(self, key: str | None = None) -> int | None:
        if key is not None and key in self.entries:
            return line(self.entries[key][0])
        return line(self.node)

    def get(self, key: str, convert: Callable[[object], Any], required: str | bool = False) -> Any:
        """The converted value of `key`, or ABSENT when missing, null or wrong (reported)."""
        if not self.has(key):
            if required:
                message = required if isinstance(required, str) else f"'{key}' is required"
                self.reader.problem(self.at(key), message, self.line(key))
            return ABSENT
        value = self.reader.scalar(self.entries[key][1], self.at(key), convert)
        if value is not ABSENT:
            self.values[key] = value
        return value

    def fields(self, **converters: Callable[[object], Any]) -> dict[str, Any]:
        """Keyword arguments for a dataclass: only the keys given, so defaults stay its own."""
        found = {key: self.get(key, convert) for key, convert in converters.items()}
        return {key: value for key, value in found.items() if value is not ABSENT}
