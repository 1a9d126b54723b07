# SPDX-License-Identifier: Apache-2.0
r"""Refuse ``re:`` patterns whose matching time can explode, at load, by reading the parsed pattern.

Python's ``re`` backtracks: ``(.*.*.*)*X`` on a 40-character name did not finish in 120 s. The
shapes that do this are a repeat whose body can itself match in many ways (a nested repeat, or
an alternation whose branches can start alike) and that is repeated without a bound. A recipe
needs none of them: qualified names are matched whole, and a glob or a flat regex says the same.

Refused (:class:`UnsafeRegexError`, naming the pattern and the part):

* a repeat holding a repeat (``(a+)+``, ``(\w+\s?)*``, ``(.*.*)*``), when the outer one is unbounded;
* an alternation under an unbounded repeat whose branches can begin with the same character
  (``(ab|a)*``, ``(.|x)+``);
* a repeat count over :data:`MAX_REPEAT` (``a{1000000}`` compiles to a huge program);
* a pattern over :data:`MAX_PATTERN_CHARS` characters.

Example:
    >>> check_regex(r"decoder\.blocks\.[2-4]\..*")
    >>> check_regex(r"(.*.*.*)*X")
    Traceback (most recent call last):
    ...
    dsrewrite.recipe.regex_cost.UnsafeRegexError: regex '(.*.*.*)*X' nests a repeat inside an unbounded repeat, which can take exponential time to match; write it without the nesting (e.g. '.*X'), or use a glob.
"""

from __future__ import annotations

import re
from typing import Any, Optional

try:  # Python 3.11+
    from re import _constants as _c  # type: ignore[attr-defined]
    from re import _parser as _p  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

__all__ = ["UnsafeRegexError", "check_regex", "MAX_PATTERN_CHARS", "MAX_REPEAT"]

MAX_PATTERN_CHARS = 1000
MAX_REPEAT = 1000

_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT} | ({_c.POSSESSIVE_REPEAT} if hasattr(_c, "POSSESSIVE_REPEAT") else set())
_ANY = object()  # "any character" in a first set


class UnsafeRegexError(ValueError):
    """A ``re:`` pattern refused because matching it can take exponential time or memory."""


def _first(items: Any) -> Optional[set[Any]]:
    """The characters a (sub)pattern can start with: a set of code points, {_ANY}, or None if it may be empty."""
    for op, av in items:
        if op is _c.LITERAL:
            return {av}
        if op in (_c.AT,):
            continue
        if op is _c.SUBPATTERN:
            got = _first(av[-1])
            if got is not None:
                return got
            continue
        if op in _REPEATS:
            got = _first(av[2])
            if av[0] > 0 and got is not None:
                return got
            return {_ANY}  # may be skipped: the next item could start it too; be conservative
        if op is _c.BRANCH:
            out: set[Any] = set()
            for b in av[1]:
                out |= _first(b) or {_ANY}
            return out
        return {_ANY}  # a class, ANY, a category, a group reference, an assertion ...
    return None


def _overlap(branches: list[Any]) -> bool:
    seen: set[Any] = set()
    for b in branches:
        f = _first(b) or {_ANY}
        if _ANY in f or _ANY in seen or f & seen:
            return True
        seen |= f
    return False


def _walk(items: Any, pattern: str, under_unbounded: bool) -> None:
    for op, av in items:
        if op in _REPEATS:
            lo, hi, body = av
            if lo > MAX_REPEAT or (hi is not _c.MAXREPEAT and hi > MAX_REPEAT):
                raise UnsafeRegexError(f"regex {pattern!r} has a repeat count over {MAX_REPEAT}; a qualified name "
                                       "is short: use a shorter count or '.*'.")
            unbounded = hi is _c.MAXREPEAT or hi == _c.MAXREPEAT
            if under_unbounded and (hi > 1 or unbounded) and body.getwidth()[1] > 0:
                raise UnsafeRegexError(
                    f"regex {pattern!r} nests a repeat inside an unbounded repeat, which can take exponential "
                    "time to match; write it without the nesting (e.g. '.*X'), or use a glob.")
            _walk(body, pattern, under_unbounded or unbounded)
        elif op is _c.SUBPATTERN:
            _walk(av[-1], pattern, under_unbounded)
        elif op is _c.BRANCH:
            if under_unbounded and _overlap(av[1]):
                raise UnsafeRegexError(
                    f"regex {pattern!r} repeats an alternation whose branches can start with the same character, "
                    "which can take exponential time to match; make the branches start differently, or use a "
                    "glob.")
            for b in av[1]:
                _walk(b, pattern, under_unbounded)
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            _walk(av[1], pattern, under_unbounded)
        elif op is _c.GROUPREF_EXISTS:
            for b in av[1:]:
                if b is not None:
                    _walk(b, pattern, under_unbounded)
        elif hasattr(_c, "ATOMIC_GROUP") and op is _c.ATOMIC_GROUP:
            _walk(av, pattern, False)  # an atomic group never backtracks into itself


def check_regex(pattern: str) -> None:
    """Refuse a regex (the text after ``re:``) whose matching cost can explode (see the module docstring).

    Raises:
        UnsafeRegexError: the pattern is too long or has a costly shape (the message names it).
        re.error: the pattern is not a valid regex.
    """
    if len(pattern) > MAX_PATTERN_CHARS:
        raise UnsafeRegexError(f"regex {pattern[:40]!r}… is too long ({len(pattern):,} characters; the bound is "
                               f"{MAX_PATTERN_CHARS:,}); qualified names are short.")
    _walk(_p.parse(pattern), pattern, False)


def compile_checked(pattern: str) -> "re.Pattern[str]":
    """``re.compile(pattern)`` after :func:`check_regex`."""
    check_regex(pattern)
    return re.compile(pattern)
