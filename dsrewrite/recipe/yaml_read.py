# SPDX-License-Identifier: Apache-2.0
r"""Reading recipe YAML: PyYAML's safe loader, duplicate keys refused, and the line of every key path.

A ``!!python/...`` tag is refused, never executed; every problem is a one-line
:class:`~dsrewrite.errors.RecipeError` naming the source and the line.

Example:
    >>> data, lines = read_yaml("name: x\nreplace:\n  order: dw_pw\n", "r.yaml")
    >>> data["replace"], lines[("replace", "order")]
    ({'order': 'dw_pw'}, 3)
    >>> read_yaml("a: 1\na: 2\n", "r.yaml")
    Traceback (most recent call last):
    ...
    dsrewrite.errors.RecipeError: r.yaml, line 2: not a valid recipe: duplicate key 'a' (first at line 1).
"""

from __future__ import annotations

from typing import Any, Optional

import yaml

from ..errors import RecipeError
from ..runtime.yaml_bounded import BoundedSafeLoader, YamlLimitError, load_bounded
from .fields import KeyPath

__all__ = ["read_yaml"]


class _StrictSafeLoader(BoundedSafeLoader):
    """PyYAML's SafeLoader (no Python tags), refusing duplicate keys, with bounded depth and aliases."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark)
        if isinstance(key, (str, int, float, bool)):
            seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _key_lines(node: Optional[yaml.Node], path: KeyPath = (), out: Optional[dict[KeyPath, int]] = None,
               seen: Optional[set[int]] = None) -> dict[KeyPath, int]:
    """Map each key path of a composed YAML document to its 1-based line.

    Memoised by node: a node reached again through an alias is not walked again (its keys'
    lines are those under its anchor), so the walk is linear in the document, not its expansion.
    """
    out = {} if out is None else out
    seen = set() if seen is None else seen
    if node is None or id(node) in seen:
        return out
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                sub = (*path, k.value)
                out[sub] = k.start_mark.line + 1
                _key_lines(v, sub, out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[(*path, i)] = v.start_mark.line + 1
            _key_lines(v, (*path, i), out, seen)
    return out


def read_yaml(text: str, source: str) -> tuple[Any, dict[KeyPath, int]]:
    try:
        data, node = load_bounded(text, _StrictSafeLoader)  # a SafeLoader: no object construction
        lines = _key_lines(node)
    except YamlLimitError as exc:
        raise RecipeError(f"{source}: refused: {exc}") from None
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = exc.problem or str(exc)
        if "constructor for the tag" in problem:
            tag = problem.split("tag", 1)[1].strip(" '").replace("tag:yaml.org,2002:", "!!")
            raise RecipeError(
                f"{source}{line}: YAML tag {tag!r} is not allowed: recipes are plain data "
                "(read with yaml.safe_load; no Python objects). Remove the tag."
            ) from None
        raise RecipeError(f"{source}{line}: not a valid recipe: {problem}.") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(
            f"{source}{where}: not valid YAML: {exc.problem or exc}. "
            "Check the indentation, the ':' after each key and the quotes."
        ) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML: {exc}.") from None
    return data, lines
