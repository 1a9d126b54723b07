# SPDX-License-Identifier: Apache-2.0
"""The registry of replacement kinds: one table, looked up by name or by built block.

Registration is code, not user input: a malformed kind raises ``TypeError``, a taken
name ``ValueError``, at once. A name that comes from a file or the command line is
looked up with :func:`get_kind`, whose ``KeyError`` lists the registered names.

Example:
    >>> kind_names()[:2]
    ('dw_pw', 'pw_dw')
    >>> get_kind("dwpw")
    Traceback (most recent call last):
    ...
    KeyError: "no replacement kind 'dwpw'; registered: 'dw_pw', 'pw_dw' (did you mean 'dw_pw'?)"
"""

from __future__ import annotations

import keyword
from typing import Optional

from torch import nn

from ..runtime.registry import Registry
from .protocol import KIND_MEMBERS, ReplacementKind, missing_members

__all__ = ["register_kind", "unregister_kind", "get_kind", "kind_names", "kinds", "kind_of", "auto_kinds",
           "RESERVED_NAMES"]

#: Names a kind may not take (``order: auto`` is the planner's choice among kinds).
RESERVED_NAMES: tuple[str, ...] = ("auto",)

_KINDS: Registry[ReplacementKind] = Registry("replacement kind", unregister="unregister_kind")


def register_kind(kind: ReplacementKind) -> ReplacementKind:
    """Add ``kind`` to the registry (returns it, so it can decorate an instance factory's result).

    Raises:
        TypeError: ``kind`` lacks protocol members (all missing ones are named), or its
            name is not a string.
        ValueError: the name is taken, reserved (``auto``) or not an identifier.

    Example:
        >>> register_kind(get_kind("dw_pw"))
        Traceback (most recent call last):
        ...
        ValueError: a replacement kind named 'dw_pw' is already registered (DwPwKind); unregister_kind('dw_pw') first, or pick another name.
    """
    missing = missing_members(kind)
    if missing:
        raise TypeError(
            f"{type(kind).__name__} is not a replacement kind: it lacks {', '.join(missing)} "
            f"(a kind needs: {', '.join(KIND_MEMBERS)}; see dsrewrite.kinds.ReplacementKind)."
        )
    name = kind.name
    if not isinstance(name, str):
        raise TypeError(f"{type(kind).__name__}.name must be a str, got {type(name).__name__}")
    if not name.isidentifier() or keyword.iskeyword(name) or name in RESERVED_NAMES:
        raise ValueError(
            f"{name!r} cannot name a replacement kind: use a Python identifier other than {RESERVED_NAMES}."
        )
    return _KINDS.add(name, kind)


def unregister_kind(name: str) -> ReplacementKind:
    """Remove and return the kind called ``name`` (``KeyError`` if there is none)."""
    return _KINDS.remove(name)


def get_kind(name: str) -> ReplacementKind:
    """The registered kind called ``name``; ``KeyError`` naming the registered ones otherwise."""
    return _KINDS.get(name)


def kind_names() -> tuple[str, ...]:
    """Registered kind names, in registration order (the built-ins first)."""
    return _KINDS.keys()


def kinds() -> tuple[ReplacementKind, ...]:
    """Registered kinds, in registration order."""
    return _KINDS.values()


def auto_kinds() -> tuple[ReplacementKind, ...]:
    """The kinds ``order: auto`` chooses among, in registration order."""
    return tuple(k for k in _KINDS.values() if k.auto)


def kind_of(module: nn.Module) -> Optional[ReplacementKind]:
    """The kind that built ``module``, or ``None`` when it is no registered kind's block.

    Example:
        >>> from dsrewrite.kinds.separable import DepthwiseSeparableConv2d
        >>> kind_of(DepthwiseSeparableConv2d(4, 4, 3, order="pw_dw")).name, kind_of(nn.Conv2d(4, 4, 3))
        ('pw_dw', None)
    """
    for kind in _KINDS.values():
        if kind.owns(module):
            return kind
    return None
