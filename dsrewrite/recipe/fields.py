# SPDX-License-Identifier: Apache-2.0
"""Validation helpers shared by the recipe readers: where a value is, and the checks of plain values.

A :class:`Ctx` knows the source's label (a path, ``builtin:NAME``, ``<mapping>``) and,
for YAML, the line of each key path; :meth:`Ctx.error` makes the one-line
:class:`~dsrewrite.errors.RecipeError` that names the file, line, key path and value.

Example:
    >>> ctx = Ctx("r.yaml", {("replace",): 3})
    >>> str(ctx.error(("replace", "order"), "'x' is not a valid order."))
    "r.yaml, line 3: replace.order: 'x' is not a valid order."
    >>> int_value(ctx, ("replace", "depth_multiplier"), 0, minimum=1)
    Traceback (most recent call last):
    ...
    dsrewrite.errors.RecipeError: r.yaml, line 3: replace.depth_multiplier: 0 is out of range: must be ≥ 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional, Sequence, Union

from ..errors import RecipeError, did_you_mean

__all__ = ["KeyPath", "Ctx", "path_str", "options_text", "type_name", "wrong_type", "as_mapping", "check_keys",
           "int_value", "number_value", "MAX_VALUE", "choice", "tristate"]

KeyPath = tuple[Union[str, int], ...]


def path_str(path: KeyPath) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class Ctx:
    """Where we are: the source's label and, for YAML, the line of each key path."""

    def __init__(self, source: str, lines: Optional[dict[KeyPath, int]] = None) -> None:
        self.source = source
        self.lines = lines or {}

    def error(self, path: KeyPath, message: str) -> RecipeError:
        where = self.source
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                where += f", line {self.lines[path[:n]]}"
                break
        key = f" {path_str(path)}:" if path else ""
        return RecipeError(f"{where}:{key} {message}")


def options_text(options: Sequence[object]) -> str:
    return ", ".join("null" if o is None else repr(o) for o in options)


def type_name(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def wrong_type(ctx: Ctx, path: KeyPath, value: object, expected: str) -> RecipeError:
    return ctx.error(path, f"expected {expected}, got {type_name(value)} {value!r}.")


def as_mapping(ctx: Ctx, path: KeyPath, value: Any, expected: str = "a mapping") -> Mapping[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise wrong_type(ctx, path, value, expected)
    return value


def check_keys(ctx: Ctx, path: KeyPath, data: Mapping[Any, Any], allowed: Sequence[str]) -> None:
    for key in data:
        if key not in allowed:
            raise ctx.error((*path, str(key)), f"unknown key {key!r}{did_you_mean(key, allowed)}; "
                            f"valid keys here: {', '.join(allowed)}.")


#: The largest integer or number a recipe field takes unless the field says less (a channel count, a size).
MAX_VALUE = 2**31 - 1


def int_value(ctx: Ctx, path: KeyPath, value: Any, *, minimum: int, maximum: int = MAX_VALUE,
              what: str = "an integer") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type(ctx, path, value, what)
    if not minimum <= value <= maximum:
        shown = repr(value) if len(str(value)) <= 24 else f"{str(value)[:12]}… ({len(str(value))} digits)"
        raise ctx.error(path, f"{shown} is out of range: must be ≥ {minimum}" +
                        (f" and ≤ {maximum}." if value > maximum else "."))
    return value


def number_value(ctx: Ctx, path: KeyPath, value: Any, *, minimum: float = 0.0, maximum: float = MAX_VALUE) -> float:
    """A finite number in [minimum, maximum] (NaN and ±inf refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise wrong_type(ctx, path, value, "a number")
    if not math.isfinite(value):
        raise ctx.error(path, f"{value!r} is not a finite number; give a number ≥ {minimum:.10g} and ≤ {maximum:.10g}.")
    if not minimum <= value <= maximum:
        raise ctx.error(path, f"{value!r} is out of range: must be ≥ {minimum:.10g}" +
                        (f" and ≤ {maximum:.10g}." if value > maximum else "."))
    return float(value) if isinstance(value, float) else value


def choice(ctx: Ctx, path: KeyPath, value: Any, options: Sequence[str], what: str,
            *, nullable: bool = False) -> Optional[str]:
    if value is None and nullable:
        return None
    if not isinstance(value, str) or value not in options:
        shown = [*options, None] if nullable else list(options)
        hint = " (write null, not 'none', for no " + what + ")" if nullable and str(value).lower() == "none" else ""
        raise ctx.error(path, f"{value!r} is not a valid {what}; valid options: {options_text(shown)}"
                        f"{did_you_mean(value, options)}{hint}.")
    return value


def tristate(ctx: Ctx, path: KeyPath, value: Any) -> Optional[bool]:
    if value is None or isinstance(value, bool):
        return value
    raise wrong_type(ctx, path, value, "true, false or null (null: don't care)")
