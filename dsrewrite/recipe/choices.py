# SPDX-License-Identifier: Apache-2.0
"""The choices a recipe offers that come from registries or fixed lists: orders, inits, graph predicates.

``replace.order`` comes from the replacement kinds (:mod:`dsrewrite.kinds`), the graph
predicates of ``select:`` from :mod:`dsrewrite.predicates`; both are read at each call,
so a kind or predicate registered after import is a valid choice. The JSON Schema parts
generated here are what ``recipe.schema.json`` must hold (a test compares them).

Example:
    >>> order_choices(), predicate_keys()[0]
    (('dw_pw', 'pw_dw', 'auto'), 'after_concat')
"""

from __future__ import annotations

from typing import Any

from ..kinds import auto_kinds, get_kind, kind_names
from ..layers.dsconv import INITS, MID_ACTS, MID_NORMS
from ..predicates import predicate_names, predicates

__all__ = [
    "AUTO",
    "ORDERS",
    "order_choices",
    "order_json_schema",
    "AUTO_ORDERS",
    "INITS",
    "MID_NORMS",
    "MID_ACT_NAMES",
    "PREDICATE_KEYS",
    "predicate_keys",
    "predicates_json_schema",
    "select_predicates_json_schema",
]

#: The ``order`` value that lets the planner choose among the kinds (per conv).
AUTO = "auto"


def order_choices() -> tuple[str, ...]:
    """Accepted ``replace.order`` values: the registered kinds' names, then ``auto``.

    Read from :mod:`dsrewrite.kinds` at each call (``ORDERS`` is the same, read on access).

    Example:
        >>> order_choices()
        ('dw_pw', 'pw_dw', 'auto')
    """
    return (*kind_names(), AUTO)


def order_json_schema() -> dict[str, Any]:
    """The ``replace.order`` property of ``recipe.schema.json``, generated from the registry.

    Example:
        >>> order_json_schema()["enum"]
        ['dw_pw', 'pw_dw', 'auto']
    """
    described = "; ".join(f"{n}: {get_kind(n).description}" for n in kind_names())
    among = ", ".join(k.name for k in auto_kinds())
    return {
        "description": f"{described}; {AUTO}: chosen per conv among {among} (see auto_order).",
        "enum": list(order_choices()),
    }


def predicate_keys() -> tuple[str, ...]:
    """The graph predicates a recipe may require, in check order: the registered ones.

    Example:
        >>> predicate_keys()
        ('after_concat', 'after_upsample', 'downstream_of_upsample', 'final_predictor', 'after_bottleneck')
    """
    return predicate_names()


def predicates_json_schema() -> dict[str, Any]:
    """``$defs.predicates`` of ``recipe.schema.json`` (``when_no_region_matches``), generated from the registry.

    Example:
        >>> predicates_json_schema()["properties"]["after_concat"]
        {'$ref': '#/$defs/tristate'}
    """
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {name: {"$ref": "#/$defs/tristate"} for name in predicate_names()},
    }


def select_predicates_json_schema() -> dict[str, Any]:
    """The graph-predicate properties of ``$defs.select`` in ``recipe.schema.json``, generated from the registry.

    Example:
        >>> select_predicates_json_schema()["after_upsample"]["description"]
        'The conv reads an upsample (through a channel concat and norm/activation/dropout/pad/crop/casts).'
    """
    return {p.name: {"$ref": "#/$defs/tristate", "description": p.description} for p in predicates()}


def __getattr__(name: str) -> Any:
    if name == "ORDERS":  # read on access: kinds may be registered after import
        return order_choices()
    if name == "PREDICATE_KEYS":  # read on access: predicates may be registered after import
        return predicate_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: how ``order: auto`` decides per conv
AUTO_ORDERS: tuple[str, ...] = ("macs", "error", "measured")
#: Accepted ``replace.mid_act`` names (besides ``null``).
MID_ACT_NAMES: tuple[str, ...] = tuple(MID_ACTS)
