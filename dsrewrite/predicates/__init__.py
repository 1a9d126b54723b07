# SPDX-License-Identifier: Apache-2.0
"""Graph predicates: yes/no properties of a conv call site read from the captured graph.

What a recipe can select on in the graph is a registered object (like the replacement
kinds of :mod:`dsrewrite.kinds`): its name is the recipe key and the fact attribute, and
it says how selection reasons phrase it, its inventory column and how to compute it from a
:class:`dsrewrite.graph.GraphView`. Recipe validation, "did you mean", the recipe JSON
Schema, selection phrases and ``dsrewrite inspect`` columns all read this registry.

Example:
    >>> from dsrewrite.predicates import predicate_names
    >>> predicate_names()
    ('after_concat', 'after_upsample', 'downstream_of_upsample', 'final_predictor', 'after_bottleneck')
"""

from .builtin import AfterBottleneck, AfterConcat, AfterUpsample, DownstreamOfUpsample, FinalPredictor
from .protocol import PREDICATE_MEMBERS, GraphPredicate, missing_members
from .registry import (
    RESERVED_NAMES,
    get_predicate,
    predicate_names,
    predicates,
    register_predicate,
    unregister_predicate,
)

for _builtin in (AfterConcat(), AfterUpsample(), DownstreamOfUpsample(), FinalPredictor(), AfterBottleneck()):
    register_predicate(_builtin)
del _builtin

__all__ = [
    "GraphPredicate",
    "PREDICATE_MEMBERS",
    "RESERVED_NAMES",
    "missing_members",
    "register_predicate",
    "unregister_predicate",
    "get_predicate",
    "predicate_names",
    "predicates",
    "AfterConcat",
    "AfterUpsample",
    "DownstreamOfUpsample",
    "FinalPredictor",
    "AfterBottleneck",
]
