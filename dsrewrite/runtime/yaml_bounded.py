# SPDX-License-Identifier: Apache-2.0
"""YAML read with bounded resources: PyYAML's SafeLoader, plus limits on size, depth, aliases and expansion.

A 1 KB "billion laughs" document (nine aliases of nine aliases ...) expands to 10⁹ nodes, a
self-referencing alias (``&a [*a]``) to an infinite one, and 50,000 nested brackets overflow
Python's stack in the composer. :class:`BoundedSafeLoader` counts while it composes and stops
at the first limit, with a :class:`YamlLimitError` (a ``yaml.YAMLError``) that says which limit,
where. The limits (:data:`LIMITS`) are far above what a recipe or an ``--arch-arg`` needs (a
built-in recipe has under 100 nodes, depth 4 and no alias).

Example:
    >>> load_bounded("a: &x [1, 2]\\nb: *x\\n")[0]
    {'a': [1, 2], 'b': [1, 2]}
    >>> load_bounded("a: &a [*a]")
    Traceback (most recent call last):
    ...
    dsrewrite.runtime.yaml_bounded.YamlLimitError: line 1: the alias *a refers to the node that holds it (a self-referencing alias); only finite trees are read.
    >>> load_bounded("[" * 100 + "]" * 100)
    Traceback (most recent call last):
    ...
    dsrewrite.runtime.yaml_bounded.YamlLimitError: line 1: nested deeper than 32 levels (the bound; a recipe or an --arch-arg value is a few levels deep).
"""

from __future__ import annotations

from typing import Any, Optional

import yaml

__all__ = ["BoundedSafeLoader", "YamlLimitError", "load_bounded", "expanded_size", "LIMITS"]

#: max_chars: text length; max_depth: nesting of collections; max_aliases: ``*name`` uses;
#: max_nodes: nodes after expanding every alias.
LIMITS = {"max_chars": 1 << 20, "max_depth": 32, "max_aliases": 100, "max_nodes": 100_000}


class YamlLimitError(yaml.YAMLError):
    """A YAML document over one of the resource limits (the message says which, and where)."""


class BoundedSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses deep nesting, many or self-referencing aliases while composing."""

    max_depth = LIMITS["max_depth"]
    max_aliases = LIMITS["max_aliases"]

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._open: list[str] = []  # anchors of the nodes being composed (ancestors of the current one)

    def compose_node(self, parent: Optional[yaml.Node], index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > self.max_aliases:
                raise YamlLimitError(f"line {line}: more than {self.max_aliases} aliases (*name); a recipe needs few.")
            if event.anchor in self._open:
                raise YamlLimitError(f"line {line}: the alias *{event.anchor} refers to the node that holds it (a "
                                     "self-referencing alias); only finite trees are read.")
            return super().compose_node(parent, index)
        anchor = getattr(event, "anchor", None)
        self._depth += 1
        if self._depth > self.max_depth:
            raise YamlLimitError(f"line {line}: nested deeper than {self.max_depth} levels (the bound; a recipe or an "
                                 "--arch-arg value is a few levels deep).")
        if anchor:
            self._open.append(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor:
                self._open.pop()


def expanded_size(node: Optional[yaml.Node], limit: int) -> int:
    """Nodes in the tree under ``node`` with every alias expanded, counted in linear time (memoised by node).

    Stops counting past ``limit`` (returns a number > ``limit``).
    """
    memo: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) in memo:
            return memo[id(n)]
        total = 1
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k) + size(v)
                if total > limit:
                    break
        elif isinstance(n, yaml.SequenceNode):
            for v in n.value:
                total += size(v)
                if total > limit:
                    break
        memo[id(n)] = total
        return total

    return 0 if node is None else size(node)


def load_bounded(text: str, loader: type[BoundedSafeLoader] = BoundedSafeLoader,
                 **limits: int) -> tuple[Any, Optional[yaml.Node]]:
    """``(data, root node)`` of one YAML document, within :data:`LIMITS` (overridable by keyword).

    Raises:
        YamlLimitError: over a limit (text length, depth, aliases, expanded nodes, or an integer
            too long for Python to convert).
        yaml.YAMLError: not valid YAML (PyYAML's own errors, with their marks).
    """
    lim = {**LIMITS, **limits}
    if len(text) > lim["max_chars"]:
        raise YamlLimitError(f"{len(text):,} characters is too large (the bound is {lim['max_chars']:,}).")
    ldr = loader(text)
    ldr.max_depth, ldr.max_aliases = lim["max_depth"], lim["max_aliases"]
    try:
        node = ldr.get_single_node()
        n = expanded_size(node, lim["max_nodes"])
        if n > lim["max_nodes"]:
            raise YamlLimitError(f"holds more than {lim['max_nodes']:,} nodes once its aliases are expanded (a recipe "
                                 "has a few dozen; many aliases of aliases make an alias bomb).")
        try:
            data = ldr.construct_document(node) if node is not None else None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise YamlLimitError(f"a value cannot be read: {exc}.") from None
        except RecursionError:  # pragma: no cover - the depth bound comes first
            raise YamlLimitError("nested too deep to read.") from None
        return data, node
    finally:
        ldr.dispose()
