# SPDX-License-Identifier: Apache-2.0
"""Matching a recipe against the facts of one model: selected, or a reason a user can read.

Checks run in a fixed order and the first failing one names the skip: transposed,
spatial dims, plain forward, ran on the example input, groups, kernel size,
channels, stride, dilation, region / include / exclude, output stride, graph
predicates (the registered ones, :mod:`dsrewrite.predicates`, phrased as each says),
then per-name overrides. ``select`` sees all facts of a model at
once because the region fallback (``when_no_region_matches``) is a model-level
decision: it applies when no conv of the model lies in any listed region.

Example:
    >>> from dsrewrite.facts import ConvFact
    >>> from dsrewrite.recipe import load_recipe
    >>> def conv(name, cin, cout, k=3):
    ...     return ConvFact(name=name, cls="torch.nn.modules.conv.Conv2d", conv_type="Conv2d", plain=True,
    ...                     in_channels=cin, out_channels=cout, kernel_size=(k, k), stride=(1, 1),
    ...                     padding=(k // 2, k // 2), dilation=(1, 1), groups=1, bias=False,
    ...                     padding_mode="zeros", dtype="float32", device="cpu",
    ...                     region=name.split(".")[0], calls=1, output_stride=2.0,
    ...                     after_concat=False, after_upsample=True, downstream_of_upsample=True)
    >>> facts = [conv("encoder.conv1", 3, 64, 7), conv("decoder.conv", 64, 32), conv("decoder.proj", 32, 32, 1)]
    >>> for s in select(load_recipe("decoder_only"), facts):
    ...     print(s.fact.name, s.selected, s.reason)
    encoder.conv1 False 7×7 not in select.kernel_size [3×3, 3×3×3, 3]
    decoder.conv True 3×3, region 'decoder'
    decoder.proj False 1×1: already pointwise
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Optional, Sequence

from ..facts import ConvFact
from ..predicates import get_predicate
from .schema import GraphPredicates, Range, Recipe, ReplaceSpec, Selector, kernel_str

__all__ = ["Selection", "select", "in_regions", "region_match"]


@dataclass(frozen=True)
class Selection:
    """The decision for one conv: ``selected`` with its ``replace`` spec, or skipped; ``reason`` either way."""

    fact: ConvFact
    selected: bool
    reason: str
    replace: Optional[ReplaceSpec] = None


def in_regions(region: str, regions: Sequence[str]) -> bool:
    """True when ``region`` equals (or glob-matches) one of ``regions``.

    Example:
        >>> in_regions("decode_head", ["decoder", "decode_*"])
        True
    """
    return any(fnmatch.fnmatchcase(region, r) for r in regions)


def region_match(name: str, regions: Sequence[str]) -> Optional[str]:
    """The region a conv called ``name`` is in: its first name component, or the outermost enclosing module
    whose own name matches one of ``regions``; None when none matches.

    A detector's feature pyramid sits inside its backbone (``backbone.fpn.layer_blocks.0``): the
    enclosing module ``fpn`` puts it in region ``backbone.fpn`` when ``fpn`` is listed.

    Example:
        >>> region_match("backbone.fpn.layer_blocks.0", ["fpn", "head"]), region_match("decoder.c", ["decoder"])
        ('backbone.fpn', 'decoder')
        >>> region_match("backbone.body.fpn", ["fpn"]) is None  # the conv itself is no enclosing module
        True
    """
    parts = name.split(".") if name else ["(root)"]
    if in_regions(parts[0], regions):
        return parts[0]
    for k in range(1, len(parts) - 1):
        if in_regions(parts[k], regions):
            return ".".join(parts[:k + 1])
    return None


def _predicate_check(fact: ConvFact, preds: GraphPredicates, key_prefix: str) -> tuple[Optional[str], list[str]]:
    """(skip reason or None, phrases for the selected reason)."""
    said = []
    for key, want in preds.required():
        have = fact.predicates.get(key)
        predicate = get_predicate(key)
        long, short = predicate.phrase, predicate.short
        setting = f"{key_prefix}.{key}: {str(want).lower()}"
        if have is None:
            have = getattr(predicate, "when_unknown", None)  # e.g. final_predictor: unknown counts as False
        if have is None:
            return (f"{key} unknown: the graph could not be captured (name-only capture), "
                    f"so {setting} cannot be checked"), said
        if have != want:
            return f"{'not ' if want else ''}{long} ({setting})", said
        if want or getattr(predicate, "when_unknown", None) is not False:  # "not a final predictor" goes unsaid
            said.append(short if want else f"not {short}")
    return None, said


def _range_check(value: float, rng: Range, label: str, key: str) -> Optional[str]:
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    if rng.min is not None and value < rng.min:
        return f"{label} {shown} < {rng.min:g} ({key}.min)"
    if rng.max is not None and value > rng.max:
        return f"{label} {shown} > {rng.max:g} ({key}.max)"
    return None


def _shortlist(items: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", … {len(items)} in all" if len(items) > n else "")


def _size_matches(value: tuple[int, ...], accepted: tuple[int, ...]) -> bool:
    """A stride/dilation: equal, or a square ``n×n`` (a plain ``n`` in the recipe) and ``n`` in every dim."""
    if value == accepted:
        return True
    return len(accepted) == 2 and accepted[0] == accepted[1] and all(v == accepted[0] for v in value)


def _hyper_skip(fact: ConvFact, sel: Selector) -> Optional[str]:
    """Skip reason from the conv's type and hyperparameters, or None."""
    dims = len(fact.kernel_size)
    transposed = "Transpose" in fact.conv_type
    if sel.transposed is not None and transposed != sel.transposed:
        return (f"{fact.conv_type}: transposed (select.transposed: false; write true or any to take it)"
                if transposed else f"{fact.conv_type}: not transposed (select.transposed: true)")
    if sel.spatial_dims is not None and dims not in sel.spatial_dims:
        return f"{fact.conv_type}: {dims}-d not in select.spatial_dims {list(sel.spatial_dims)}"
    if not fact.plain:
        return (f"{fact.cls.rsplit('.', 1)[-1]} has its own forward (e.g. SAME padding, weight "
                "standardisation): a plain separable conv would change the output")
    if fact.calls == 0:
        return "never ran on the example input: its shapes and graph position are unknown"
    if fact.groups > 1 and fact.groups == fact.in_channels:
        return f"depthwise (groups={fact.groups}): already separable"
    if sel.groups is not None and fact.groups not in sel.groups:
        return (f"grouped (groups={fact.groups}) not in select.groups [{', '.join(map(str, sel.groups))}] "
                "(write groups: any to take grouped convs)")
    k = tuple(fact.kernel_size)
    if all(v == 1 for v in k):
        return f"{kernel_str(k)}: already pointwise"
    if sel.kernel_sizes is not None and k not in sel.kernel_sizes:
        return f"{kernel_str(k)} not in select.kernel_size [{', '.join(map(kernel_str, sel.kernel_sizes))}]"
    for value, rng, label in ((fact.in_channels, sel.in_channels, "in_channels"),
                              (fact.out_channels, sel.out_channels, "out_channels")):
        if (why := _range_check(value, rng, label, f"select.{label}")) is not None:
            return why
    for value, accepted, label in ((tuple(fact.stride), sel.strides, "stride"),
                                   (tuple(fact.dilation), sel.dilations, "dilation")):
        if accepted is not None and not any(_size_matches(value, a) for a in accepted):
            return f"{label} {kernel_str(value)} not in select.{label} [{', '.join(map(kernel_str, accepted))}]"
    return None


def _where_check(fact: ConvFact, sel: Selector, fallback: bool) -> tuple[Optional[str], list[str]]:
    """Region / include / exclude / output stride / graph predicates: (skip reason or None, phrases)."""
    said: list[str] = []
    if sel.regions is not None and not fallback:
        region = region_match(fact.name, sel.regions)
        if region is None:
            return f"region {fact.region!r} not in select.regions [{_shortlist(list(sel.regions))}]", said
        said.append(f"region {region!r}")
    if fallback:
        preds = sel.when_no_region_matches or GraphPredicates()
        why, phrases = _predicate_check(fact, preds, "select.when_no_region_matches")
        if why is not None:
            return f"{why}; fallback: no conv of the model is in select.regions", said
        said.extend(phrases)
        said.append("fallback: no conv in select.regions")
    if sel.include:
        hit = next((p for p in sel.include if p.matches(fact.name)), None)
        if hit is None:
            return f"matches no select.include pattern ({_shortlist([p.text for p in sel.include])})", said
        said.append(f"include {hit.text!r}")
    hit = next((p for p in sel.exclude if p.matches(fact.name)), None)
    if hit is not None:
        return f"excluded by select.exclude {hit.text!r}", said
    if not sel.output_stride.unbounded:
        if fact.output_stride is None:
            return ("output stride unknown (no output shape was captured), "
                    "so select.output_stride cannot be checked"), said
        why_os = _range_check(fact.output_stride, sel.output_stride, "output stride", "select.output_stride")
        if why_os is not None:
            return why_os, said
        said.append(f"output stride {fact.output_stride:g}")
    why, phrases = _predicate_check(fact, sel.graph, "select")
    said.extend(phrases)
    return why, said


def select(recipe: Recipe, facts: Sequence[ConvFact]) -> list[Selection]:
    """Decide, for each fact of one model, whether ``recipe`` selects it; one :class:`Selection` per fact, same order.

    Example:
        >>> from dsrewrite.recipe import load_recipe
        >>> select(load_recipe("all_3x3"), [])
        []
    """
    sel = recipe.select
    fallback = (sel.regions is not None and sel.when_no_region_matches is not None
                and not any(region_match(f.name, sel.regions) is not None for f in facts))
    out = []
    for fact in facts:
        why = _hyper_skip(fact, sel)
        said: list[str] = [kernel_str(tuple(fact.kernel_size))]
        if why is None:
            why, where = _where_check(fact, sel, fallback)
            said.extend(where)
        if why is not None:
            out.append(Selection(fact, False, why))
            continue
        spec = recipe.replace
        override = next((o for o in recipe.overrides if o.matches(fact.name)), None)
        if override is not None:
            if override.skip:
                out.append(Selection(fact, False, f"skipped by {override.label()}"))
                continue
            spec = override.replace.apply(spec)
            said.append(f"{override.label()}: {override.replace.describe()}")
        out.append(Selection(fact, True, ", ".join(said), spec))
    return out
