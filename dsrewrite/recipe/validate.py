# SPDX-License-Identifier: Apache-2.0
"""Validation of parsed recipe data into the frozen records of :mod:`dsrewrite.recipe.schema`.

Everything is validated here, once; every problem is a :class:`~dsrewrite.errors.RecipeError`
whose message names the file (or ``builtin:NAME`` / ``<mapping>``), the line where known,
the key path (e.g. ``overrides[0].replace.order``), the bad value, the valid options and
the closest one. The graph-predicate keys of ``select:`` are the registered predicates
(:mod:`dsrewrite.predicates`).

Example:
    >>> parse_recipe({"name": "x", "select": {"regions": ["decoder"]}}).select.regions
    ('decoder',)
    >>> parse_recipe({"select": {"after_concatt": True}})
    Traceback (most recent call last):
    ...
    dsrewrite.errors.RecipeError: <mapping>: select.after_concatt: unknown key 'after_concatt' (did you mean 'after_concat'?); valid keys here: kernel_size, groups, spatial_dims, transposed, in_channels, out_channels, stride, dilation, regions, when_no_region_matches, include, exclude, output_stride, after_concat, after_upsample, downstream_of_upsample, final_predictor, after_bottleneck.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

from ..errors import did_you_mean
from .choices import predicate_keys
from .fields import MAX_VALUE, Ctx, KeyPath, as_mapping, check_keys, int_value, number_value, tristate, wrong_type
from .names import extend
from .replace_keys import replace_values
from .regex_cost import UnsafeRegexError
from .schema import (
    GraphPredicates,
    Kernel,
    LatencySpec,
    NamePattern,
    Override,
    Range,
    Recipe,
    ReplacePatch,
    ReplaceSpec,
    Selector,
)

__all__ = ["parse_recipe", "select_keys", "TOP_KEYS", "LATENCY_KEYS", "OVERRIDE_KEYS", "SELECT_KEYS"]

TOP_KEYS: tuple[str, ...] = ("name", "description", "extends", "select", "replace", "overrides", "latency",
                             "budget")
LATENCY_KEYS: tuple[str, ...] = ("min_speedup", "rounds", "warmup", "channels_last")
#: The keys of ``select:`` besides the graph predicates.
SELECT_FIXED_KEYS: tuple[str, ...] = (
    "kernel_size", "groups", "spatial_dims", "transposed", "in_channels", "out_channels", "stride", "dilation",
    "regions", "when_no_region_matches", "include", "exclude", "output_stride",
)
OVERRIDE_KEYS: tuple[str, ...] = ("match", "replace", "skip")
#: latency: the largest min_speedup (a bound, not a goal: a test keeps a conv dense with 1000) and rounds/warmup (each round times every candidate).
MAX_MIN_SPEEDUP = 1e6
MAX_ROUNDS = 10_000

_KERNEL_RE = re.compile(r"^\s*(\d+)\s*(?:[x×X*]\s*(\d+)\s*)?(?:[x×X*]\s*(\d+)\s*)?$")
#: ``select.groups: any`` / ``select.transposed: any``
ANY = "any"


def select_keys() -> tuple[str, ...]:
    """The keys of ``select:``: the fixed ones, then the registered graph predicates."""
    return (*SELECT_FIXED_KEYS, *predicate_keys())


def __getattr__(name: str) -> Any:
    if name == "SELECT_KEYS":  # read on access: predicates may be registered after import
        return select_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_recipe(data: Any, *, source: str = "<mapping>", default_name: str = "custom",
                 lines: Optional[dict[KeyPath, int]] = None) -> Recipe:
    """Validate parsed recipe data (as from ``yaml.safe_load``) into a :class:`Recipe`.

    Raises:
        RecipeError: the data is not a valid recipe (where, the value, the valid options).
    """
    ctx = Ctx(source, lines)
    data = as_mapping(ctx, (), data, "a mapping (the recipe)")
    check_keys(ctx, (), data, TOP_KEYS)
    if "extends" in data:
        data = extend(ctx, data)
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise wrong_type(ctx, ("name",), name, "a non-empty string")
    desc = data.get("description", "")
    if desc is None:
        desc = ""
    if not isinstance(desc, str):
        raise wrong_type(ctx, ("description",), desc, "a string")
    return Recipe(
        name=name.strip(),
        description=desc.strip(),
        source=source,
        select=_selector(ctx, data.get("select")),
        replace=_replace_spec(ctx, ("replace",), data.get("replace")),
        overrides=_overrides(ctx, data.get("overrides")),
        latency=_latency(ctx, data.get("latency")),
        budget=_budget(ctx, data.get("budget")),
    )


def _budget(ctx: Ctx, value: Any) -> Any:
    """The optional ``budget:`` section (:mod:`dsrewrite.budget.types`): keys, numbers, then the cross-key rules."""
    from ..budget.types import BUDGET_KEYS, BudgetError, parse_budget

    if value is None:
        return None
    path: KeyPath = ("budget",)
    data = as_mapping(ctx, path, value)
    check_keys(ctx, path, data, BUDGET_KEYS)
    for key, v in data.items():
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise wrong_type(ctx, (*path, key), v, "a number > 0 (≤ 1: a fraction of the whole model)")
        if not (v > 0 and v != float("inf")):
            raise ctx.error((*path, key), f"{v!r} is out of range: must be a finite number > 0.")
    try:
        return parse_budget(dict(data), source=f"{ctx.source}: budget")
    except BudgetError as exc:
        raise ctx.error(path, str(exc).split(": budget: ", 1)[-1]) from exc


def _latency(ctx: Ctx, value: Any) -> Optional[LatencySpec]:
    """The optional ``latency:`` section (latency-aware selection)."""
    if value is None:
        return None
    path: KeyPath = ("latency",)
    data = as_mapping(ctx, path, value)
    check_keys(ctx, path, data, LATENCY_KEYS)
    out: dict[str, Any] = {}
    if data.get("min_speedup") is not None:
        v = data["min_speedup"]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise wrong_type(ctx, (*path, "min_speedup"), v, "a number > 0, e.g. 1.1")
        if not 0 < v <= MAX_MIN_SPEEDUP:  # NaN fails both
            raise ctx.error((*path, "min_speedup"), f"{v!r} is out of range: must be > 0 and ≤ {MAX_MIN_SPEEDUP:g} "
                            "(1.1 = at least 10% faster).")
        out["min_speedup"] = float(v)
    if data.get("rounds") is not None:
        out["rounds"] = int_value(ctx, (*path, "rounds"), data["rounds"], minimum=1, maximum=MAX_ROUNDS)
    if data.get("warmup") is not None:
        out["warmup"] = int_value(ctx, (*path, "warmup"), data["warmup"], minimum=0, maximum=MAX_ROUNDS)
    if data.get("channels_last") is not None:
        v = data["channels_last"]
        if not isinstance(v, bool):
            raise wrong_type(ctx, (*path, "channels_last"), v, "true or false")
        out["channels_last"] = v
    return LatencySpec(**out)


def _pair(ctx: Ctx, path: KeyPath, value: Any, what: str) -> Kernel:
    """``3``, ``"3x3"``, ``"3×3"``, ``[3, 3]`` → ``(3, 3)``; ``"3x3x3"``, ``[3, 3, 3]`` → ``(3, 3, 3)``; ``[3]`` → ``(3,)``.

    A plain number (``3``, ``"3"``) is square, ``n×n``, as it always was.
    """
    expected = f"a {what} like 3, '3x3', '3x3x3', [3, 3] or [3] (1-d)"
    if isinstance(value, bool):
        raise wrong_type(ctx, path, value, expected)
    if isinstance(value, int):
        pair: Kernel = (value, value)
    elif isinstance(value, str):
        m = _KERNEL_RE.match(value)
        if not m:
            raise wrong_type(ctx, path, value, expected)
        nums = [int(g) for g in m.groups() if g is not None]
        pair = (nums[0], nums[0]) if len(nums) == 1 else tuple(nums)
    elif isinstance(value, (list, tuple)) and 1 <= len(value) <= 3 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        pair = tuple(int(v) for v in value)
    else:
        raise wrong_type(ctx, path, value, expected)
    if min(pair) < 1 or max(pair) > MAX_VALUE:
        raise ctx.error(path, f"{value!r} is out of range: each {what} must be ≥ 1 and ≤ {MAX_VALUE}.")
    return pair


def _groups(ctx: Ctx, path: KeyPath, value: Any) -> Optional[tuple[int, ...]]:
    """``[1]`` (dense only, the default), a list of accepted groups, or ``any`` (``None``: dense and grouped)."""
    if value == ANY:
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ctx.error(path, "an empty list accepts no conv; write [1] (dense) or 'any'.")
    out = []
    for i, g in enumerate(items):
        where = (*path, i) if items is value else path
        if isinstance(g, str):
            raise ctx.error(where, f"{g!r} is not a number of groups{did_you_mean(g, [ANY])}; "
                            f"valid options: an integer ≥ 1, a list of them, or '{ANY}'.")
        out.append(int_value(ctx, where, g, minimum=1))
    return tuple(dict.fromkeys(out))


def _spatial_dims(ctx: Ctx, path: KeyPath, value: Any) -> Optional[tuple[int, ...]]:
    """``[3]``, ``[1, 2]`` or ``3``: the accepted numbers of spatial dims (absent: any)."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ctx.error(path, "an empty list accepts no conv; remove the key to accept any.")
    out = []
    for i, d in enumerate(items):
        where = (*path, i) if items is value else path
        if isinstance(d, bool) or d not in (1, 2, 3):
            raise ctx.error(where, f"{d!r} is not a number of spatial dims; valid options: 1, 2, 3.")
        out.append(int(d))
    return tuple(dict.fromkeys(out))


def _transposed(ctx: Ctx, path: KeyPath, value: Any) -> Optional[bool]:
    """``false`` (regular convs only, the default), ``true`` (transposed only) or ``any`` (``None``)."""
    if isinstance(value, bool):
        return value
    if value == ANY:
        return None
    raise ctx.error(path, f"{value!r} is not valid{did_you_mean(str(value), ['true', 'false', ANY])}; "
                    f"valid options: false (regular convs only, the default), true (transposed only), {ANY}.")


def _pairs(ctx: Ctx, path: KeyPath, value: Any, what: str) -> Optional[tuple[Kernel, ...]]:
    """A list of accepted sizes (``[3, 5]`` is 3×3 or 5×5; write ``[[3, 5]]`` or ``['3x5']`` for 3×5)."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ctx.error(path, f"an empty list accepts no {what}; remove the key to accept any.")
    pairs = [_pair(ctx, (*path, i) if items is value else path, v, what) for i, v in enumerate(items)]
    return tuple(dict.fromkeys(pairs))


def _range(ctx: Ctx, path: KeyPath, value: Any, *, integer: bool) -> Range:
    if value is None:
        return Range()
    num = "an integer" if integer else "a number"
    if isinstance(value, Mapping):
        check_keys(ctx, path, value, ("min", "max"))
        bounds: dict[str, Optional[float]] = {}
        for key in ("min", "max"):
            v = value.get(key)
            if v is None:
                bounds[key] = None
            elif integer:
                bounds[key] = int_value(ctx, (*path, key), v, minimum=0)
            else:
                bounds[key] = number_value(ctx, (*path, key), v)
        lo, hi = bounds["min"], bounds["max"]
        if lo is not None and hi is not None and lo > hi:
            raise ctx.error(path, f"min {lo!r} > max {hi!r}: the range is empty; swap them.")
        return Range(lo, hi)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and isinstance(value, float)):
        raise wrong_type(ctx, path, value, f"{num} or a mapping like {{min: 16}} / {{min: 16, max: 512}}")
    v = int_value(ctx, path, value, minimum=0) if integer else number_value(ctx, path, value)
    return Range(v, v)


def _patterns(ctx: Ctx, path: KeyPath, value: Any, *, allow_empty: bool = True) -> tuple[NamePattern, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    out = []
    for i, v in enumerate(items):
        where = (*path, i) if items is value else path
        if not isinstance(v, str) or not v.strip():
            raise wrong_type(ctx, where, v, "a qualified-name glob like 'decoder.*' or a regex 're:...'")
        try:
            out.append(NamePattern(v.strip()))
        except UnsafeRegexError as exc:
            raise ctx.error(where, f"refused: {exc}") from None
        except re.error as exc:
            raise ctx.error(where, f"{v!r} is not a valid regex: {exc}. Escape literal dots as '\\.'; "
                            "or drop the 're:' prefix to use a glob.") from None
    if not out and not allow_empty:
        raise ctx.error(path, "an empty list matches no conv; give at least one pattern.")
    return tuple(out)


def _regions(ctx: Ctx, path: KeyPath, value: Any) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ctx.error(path, "an empty list selects no conv; remove the key to accept every region.")
    out = []
    for i, v in enumerate(items):
        where = (*path, i) if items is value else path
        if not isinstance(v, str) or not v.strip():
            raise wrong_type(ctx, where, v, "a region name (the first part of a qualified name, e.g. 'decoder')")
        out.append(v.strip())
    return tuple(out)


def _predicates(ctx: Ctx, path: KeyPath, data: Mapping[Any, Any]) -> GraphPredicates:
    return GraphPredicates(**{k: tristate(ctx, (*path, k), data.get(k)) for k in predicate_keys()})


def _selector(ctx: Ctx, value: Any) -> Selector:
    path: KeyPath = ("select",)
    data = as_mapping(ctx, path, value)
    check_keys(ctx, path, data, select_keys())
    kernels = _pairs(ctx, (*path, "kernel_size"), data.get("kernel_size"), "kernel size")
    for i, k in enumerate(kernels or ()):
        if all(v == 1 for v in k):
            raise ctx.error((*path, "kernel_size", i) if isinstance(data.get("kernel_size"), list) else
                            (*path, "kernel_size"), "1x1 convs are already pointwise: there is nothing to "
                            "separate. Remove '1x1'.")
    groups = _groups(ctx, (*path, "groups"), data.get("groups", [1]))
    regions = _regions(ctx, (*path, "regions"), data.get("regions"))
    fallback_raw = data.get("when_no_region_matches")
    fallback = None
    if fallback_raw is not None:
        fpath = (*path, "when_no_region_matches")
        fdata = as_mapping(ctx, fpath, fallback_raw, "a mapping like {downstream_of_upsample: true}")
        check_keys(ctx, fpath, fdata, predicate_keys())
        if regions is None:
            raise ctx.error(fpath, "has no effect without select.regions; add regions or remove it.")
        fallback = _predicates(ctx, fpath, fdata)
    return Selector(
        kernel_sizes=kernels,
        groups=groups,
        spatial_dims=_spatial_dims(ctx, (*path, "spatial_dims"), data.get("spatial_dims")),
        transposed=_transposed(ctx, (*path, "transposed"), data.get("transposed", False)),
        in_channels=_range(ctx, (*path, "in_channels"), data.get("in_channels"), integer=True),
        out_channels=_range(ctx, (*path, "out_channels"), data.get("out_channels"), integer=True),
        strides=_pairs(ctx, (*path, "stride"), data.get("stride"), "stride"),
        dilations=_pairs(ctx, (*path, "dilation"), data.get("dilation"), "dilation"),
        regions=regions,
        when_no_region_matches=fallback,
        include=_patterns(ctx, (*path, "include"), data.get("include")),
        exclude=_patterns(ctx, (*path, "exclude"), data.get("exclude")),
        output_stride=_range(ctx, (*path, "output_stride"), data.get("output_stride"), integer=False),
        graph=_predicates(ctx, path, data),
    )


def _replace_spec(ctx: Ctx, path: KeyPath, value: Any) -> ReplaceSpec:
    values = replace_values(ctx, path, as_mapping(ctx, path, value))
    if "energy" in values:
        values.setdefault("depth_multiplier", None)
    return ReplaceSpec(**values)


def _overrides(ctx: Ctx, value: Any) -> tuple[Override, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise wrong_type(ctx, ("overrides",), value,
                          "a list of {match: ..., replace: {...}} or {match: ..., skip: true}")
    out = []
    for i, item in enumerate(value):
        path: KeyPath = ("overrides", i)
        data = as_mapping(ctx, path, item, "a mapping like {match: 'decoder.blocks.0.*', replace: {depth_multiplier: 2}}")
        check_keys(ctx, path, data, OVERRIDE_KEYS)
        if "match" not in data:
            raise ctx.error(path, "missing key 'match' (a qualified-name glob, 're:' regex, or a list of them).")
        match = _patterns(ctx, (*path, "match"), data["match"], allow_empty=False)
        skip = data.get("skip", False)
        if not isinstance(skip, bool):
            raise wrong_type(ctx, (*path, "skip"), skip, "true or false")
        rdata = as_mapping(ctx, (*path, "replace"), data.get("replace"))
        patch = replace_values(ctx, (*path, "replace"), rdata)
        if skip and patch:
            raise ctx.error(path, "sets both skip: true and replace: an override either skips or replaces.")
        if not skip and not patch:
            raise ctx.error(path, "does nothing: give replace: {...} or skip: true.")
        out.append(Override(index=i, match=match, replace=ReplacePatch(tuple(patch.items())), skip=skip))
    return tuple(out)
