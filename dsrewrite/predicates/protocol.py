# SPDX-License-Identifier: Apache-2.0
"""What a graph predicate is: the protocol every registered predicate follows.

A graph predicate is a yes/no property of a conv call site, read from the captured graph
(:class:`dsrewrite.graph.GraphView`). Recipes select on it (``select.<name>: true``), the
selection reason phrases it, ``dsrewrite inspect`` shows it as a column and the recipe
JSON Schema lists it. A module's value is OR-ed over its call sites; it is ``None`` on
a fact when the graph could not be captured.

Example:
    >>> from dsrewrite.predicates import get_predicate
    >>> p = get_predicate("after_concat")
    >>> p.phrase, p.short, p.column
    ('after a concat', 'after concat', 'cat')
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["GraphPredicate", "PREDICATE_MEMBERS", "missing_members"]

#: The members a predicate must have (checked by :func:`dsrewrite.predicates.register_predicate`).
PREDICATE_MEMBERS: tuple[str, ...] = ("name", "description", "phrase", "short", "column", "legend", "holds")


@runtime_checkable
class GraphPredicate(Protocol):
    """A registered graph predicate.

    ``name`` is the recipe key and the fact attribute; ``description`` one line for the
    JSON Schema; ``phrase`` how a skip reason says it holds (``'not ' + phrase`` when it
    must not); ``short`` the same in a selected reason; ``column`` the inventory column
    header and ``legend`` its explanation under the table. ``holds(view, node)`` says
    whether it holds at one conv call site ``node`` of ``view`` (a ``GraphView``). An optional
    ``when_unknown`` (True/False) is the value selection assumes when a fact's value is unknown;
    without it an unknown value skips the conv with the reason.
    """

    name: str
    description: str
    phrase: str
    short: str
    column: str
    legend: str

    def holds(self, view: Any, node: Any) -> bool: ...


def missing_members(obj: object, members: tuple[str, ...] = PREDICATE_MEMBERS) -> tuple[str, ...]:
    """The members of ``members`` that ``obj`` lacks (``holds`` must be callable).

    Example:
        >>> missing_members(object())
        ('name', 'description', 'phrase', 'short', 'column', 'legend', 'holds')
    """
    out = []
    for m in members:
        value = getattr(obj, m, None)
        if value is None or (m == "holds" and not callable(value)):
            out.append(m)
    return tuple(out)
