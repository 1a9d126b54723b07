# SPDX-License-Identifier: Apache-2.0
"""The registry of graph predicates: one ordered table, looked up by name.

Registration is code, not user input: a malformed predicate raises ``TypeError``, a taken
or unusable name ``ValueError``, at once. The order of registration is the order in which
a recipe's predicates are checked, the inventory's column order and the JSON order.

Example:
    >>> predicate_names()
    ('after_concat', 'after_upsample', 'downstream_of_upsample', 'final_predictor', 'after_bottleneck')
    >>> get_predicate("after_concatt")
    Traceback (most recent call last):
    ...
    KeyError: "no graph predicate 'after_concatt'; registered: 'after_concat', 'after_upsample', 'downstream_of_upsample', 'final_predictor', 'after_bottleneck' (did you mean 'after_concat'?)"
"""

from __future__ import annotations

import keyword

from ..runtime.registry import Registry
from .protocol import PREDICATE_MEMBERS, GraphPredicate, missing_members

__all__ = ["register_predicate", "unregister_predicate", "get_predicate", "predicate_names", "predicates",
           "RESERVED_NAMES"]

#: Names a predicate may not take: the other keys of a recipe's ``select:`` section and the
#: fields of a conv fact.
RESERVED_NAMES: tuple[str, ...] = (
    "kernel_size", "groups", "in_channels", "out_channels", "stride", "dilation", "regions",
    "when_no_region_matches", "include", "exclude", "output_stride", "name", "cls", "conv_type", "plain",
    "kernel_sizes", "padding", "bias", "padding_mode", "dtype", "device", "region", "calls", "input_shape",
    "output_shape", "shared", "predicates", "to_dict", "required", "values",
)

_PREDICATES: Registry[GraphPredicate] = Registry("graph predicate", unregister="unregister_predicate")


def register_predicate(predicate: GraphPredicate) -> GraphPredicate:
    """Add ``predicate`` to the registry (returns it).

    Raises:
        TypeError: ``predicate`` lacks protocol members (all missing ones are named), or
            a text member is not a string.
        ValueError: the name is taken, reserved or not an identifier.

    Example:
        >>> register_predicate(get_predicate("after_concat"))
        Traceback (most recent call last):
        ...
        ValueError: a graph predicate named 'after_concat' is already registered (AfterConcat); unregister_predicate('after_concat') first, or pick another name.
    """
    missing = missing_members(predicate)
    if missing:
        raise TypeError(
            f"{type(predicate).__name__} is not a graph predicate: it lacks {', '.join(missing)} "
            f"(a predicate needs: {', '.join(PREDICATE_MEMBERS)}; see dsrewrite.predicates.GraphPredicate)."
        )
    for member in ("name", "description", "phrase", "short", "column", "legend"):
        value = getattr(predicate, member)
        if not isinstance(value, str) or not value:
            raise TypeError(f"{type(predicate).__name__}.{member} must be a non-empty str, got {value!r}")
    name = predicate.name
    if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_") or name in RESERVED_NAMES:
        raise ValueError(
            f"{name!r} cannot name a graph predicate: use a Python identifier not starting with '_' "
            f"and not one of the other select keys or fact fields ({', '.join(RESERVED_NAMES)})."
        )
    return _PREDICATES.add(name, predicate)


def unregister_predicate(name: str) -> GraphPredicate:
    """Remove and return the predicate called ``name`` (``KeyError`` if there is none)."""
    return _PREDICATES.remove(name)


def get_predicate(name: str) -> GraphPredicate:
    """The registered predicate called ``name``; ``KeyError`` naming the registered ones otherwise."""
    return _PREDICATES.get(name)


def predicate_names() -> tuple[str, ...]:
    """The registered names, in registration (= check) order."""
    return _PREDICATES.keys()


def predicates() -> tuple[GraphPredicate, ...]:
    """The registered predicates, in registration (= check) order."""
    return _PREDICATES.values()
