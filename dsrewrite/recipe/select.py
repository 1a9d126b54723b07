# SPDX-License-Identifier: Apache-2.0
"""Matching a recipe against the facts of one model: selected, or a reason a user can read.

Checks run in a fixed order and the first failing one names the skip: conv
type, transposed, plain forward, ran on the example input, groups, kernel size,
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
    encoder.conv1 False 7×7 not in select.kernel_size [3×3]
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

__all__ = ["Selection", "select", "in_regions"]


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


def _predicate_check(fact: ConvFact, preds: GraphPredicates, key_prefix: str) -> tuple[Optional[str], list[str]]:
    """(skip reason or None, phrases for the selected reason)."""
    said = []
    for key, want in preds.required():
        have = fact.predicates.get(key)
        predicate = get_predicate(key)
        long, short = predicate.phrase, predicate.short
        setting = f"{key_prefix}.{key}: {str(want).lower()}"
        if have is None:
            return (f"{key} unknown: the graph could not be captured (name-only capture), "
                    f"so {setting} cannot be checked"), said
        if have != want:
            return f"{'not ' if want else ''}{long} ({setting})", said
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


def _hyper_skip(fact: ConvFact, sel: Selector) -> Optional[str]:
    """Skip reason from the conv's type and hyperparameters, or None."""
    if "Transpose" in fact.conv_type:
        return f"{fact.conv_type}: transposed convs are not separated"
    if fact.conv_type != "Conv2d":
        return f"{fact.conv_type}: only Conv2d can be separated"
    if not fact.plain:
        return (f"{fact.cls.rsplit('.', 1)[-1]} has its own forward (e.g. SAME padding, weight "
                "standardisation): a plain separable conv would change the output")
    if fact.calls == 0:
        return "never ran on the example input: its shapes and graph position are unknown"
    if fact.groups not in sel.groups:
        if fact.groups == fact.in_channels:
            return f"depthwise (groups={fact.groups}): already separable"
        return f"grouped (groups={fact.groups}): only dense convs (groups=1) can be separated"
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
        if accepted is not None and value not in accepted:
            return f"{label} {kernel_str(value)} not in select.{label} [{', '.join(map(kernel_str, accepted))}]"
    return None


def _where_check(fact: ConvFact, sel: Selector, fallback: bool) -> tuple[Optional[str], list[str]]:
    """Region / include / exclude / output stride / graph predicates: (skip reason or None, phrases)."""
    said: list[str] = []
    if sel.regions is not None and not fallback:
        if not in_regions(fact.region, sel.regions):
            return f"region {fact.region!r} not in select.regions [{_shortlist(list(sel.regions))}]", said
        said.append(f"region {fact.region!r}")
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
                and not any(in_regions(f.region, sel.regions) for f in facts))
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
