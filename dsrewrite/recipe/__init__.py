# SPDX-License-Identifier: Apache-2.0
"""Recipes: which convs to separate, and what to put in their place.

A recipe is a small YAML file (or a built-in name, or a mapping) validated once
into frozen records; :func:`select` matches it against a model's
:class:`~dsrewrite.facts.ConvFact` list. See ``docs/recipes.md``.

Example:
    >>> from dsrewrite.recipe import load_recipe, builtin_recipes
    >>> "decoder_only" in builtin_recipes()
    True
    >>> r = load_recipe("decoder_only")
    >>> r.replace.describe(), r.select.in_channels.describe()
    ('dw_pw m=1 init=svd', '≥ 16')
"""

from .load import builtin_recipe_path, builtin_recipes, load_recipe, parse_recipe
from .schema import (
    GraphPredicates,
    NamePattern,
    Override,
    Range,
    Recipe,
    ReplacePatch,
    ReplaceSpec,
    Selector,
)
from .select import Selection, select

__all__ = [
    "load_recipe",
    "parse_recipe",
    "builtin_recipes",
    "builtin_recipe_path",
    "select",
    "Selection",
    "Recipe",
    "Selector",
    "ReplaceSpec",
    "ReplacePatch",
    "Override",
    "Range",
    "NamePattern",
    "GraphPredicates",
]
