# SPDX-License-Identifier: Apache-2.0
"""The built-in graph predicates: after a concat, after an upsample, downstream of an upsample.

"Comes from" looks through pass-through nodes (see :mod:`dsrewrite.graph`); each
``holds(view, node)`` reads one conv call site ``node`` of a ``GraphView``.

Example:
    >>> [p.column for p in (AfterConcat(), AfterUpsample(), DownstreamOfUpsample())]
    ['cat', 'up', '↓up']
"""

from __future__ import annotations

from typing import Any

__all__ = ["AfterConcat", "AfterUpsample", "DownstreamOfUpsample"]


class AfterConcat:
    """The conv's input comes from a concatenation."""

    name = "after_concat"
    description = "The conv reads a torch.cat (possibly through norm/activation)."
    phrase, short = "after a concat", "after concat"
    column, legend = "cat", "after concat"

    def holds(self, view: Any, node: Any) -> bool:
        return view.source_of(node) in view.cat_inputs


class AfterUpsample:
    """The conv's input comes from an upsample, directly or through a concat with an upsampled input."""

    name = "after_upsample"
    description = "The conv reads an upsample (possibly through concat/norm/activation)."
    phrase, short = "right after an upsample", "after upsample"
    column, legend = "up", "after upsample"

    def holds(self, view: Any, node: Any) -> bool:
        src = view.source_of(node)
        if src is None:
            return False
        if src in view.upsample:
            return True
        return src in view.cat_inputs and any(view.source(i) in view.upsample for i in view.cat_inputs[src])


class DownstreamOfUpsample:
    """Some upsample lies on some path from the model input to the conv."""

    name = "downstream_of_upsample"
    description = "Some upsample runs before the conv in the graph."
    phrase, short = "downstream of an upsample", "downstream of upsample"
    column, legend = "↓up", "downstream of upsample"

    def holds(self, view: Any, node: Any) -> bool:
        return view.downstream_of_upsample(node)
