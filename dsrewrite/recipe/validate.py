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
    dsrewrite.errors.RecipeError: <mapping>: select.after_concatt: unknown key 'after_concatt' (did you mean 'after_concat'?); valid keys here: kernel_size, groups, in_channels, out_channels, stride, dilation, regions, when_no_region_matches, include, exclude, output_stride, after_concat, after_upsample, downstream_of_upsample.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

from .choices import predicate_keys
from .fields import Ctx, KeyPath, as_mapping, check_keys, int_value, number_value, tristate, wrong_type
from .names import extend
from .replace_keys import replace_values
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
    "kernel_size", "groups", "in_channels", "out_channels", "stride", "dilation", "regions",
    "when_no_region_matches", "include", "exclude", "output_stride",
)
OVERRIDE_KEYS: tuple[str, ...] = ("match", "replace", "skip")
_KERNEL_RE = re.compile(r"^\s*(\d+)\s*(?:[x×X*]\s*(\d+)\s*)?$")


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
        if not v > 0:
            raise ctx.error((*path, "min_speedup"), f"{v!r} is out of range: must be > 0 (1.1 = at least 10% faster).")
        out["min_speedup"] = float(v)
    if data.get("rounds") is not None:
        out["rounds"] = int_value(ctx, (*path, "rounds"), data["rounds"], minimum=1)
    if data.get("warmup") is not None:
        out["warmup"] = int_value(ctx, (*path, "warmup"), data["warmup"], minimum=0)
    if data.get("channels_last") is not None:
        v = data["channels_last"]
        if not isinstance(v, bool):
            raise wrong_type(ctx, (*path, "channels_last"), v, "true or false")
        out["channels_last"] = v
    return LatencySpec(**out)


def _pair(ctx: Ctx, path: KeyPath, value: Any, what: str) -> Kernel:
    """``3``, ``"3x3"``, ``"3×3"``, ``[3, 3]`` → ``(3, 3)``."""
    expected = f"a {what} like 3, '3x3' or [3, 3]"
    if isinstance(value, bool):
        raise wrong_type(ctx, path, value, expected)
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, str):
        m = _KERNEL_RE.match(value)
        if not m:
            raise wrong_type(ctx, path, value, expected)
        pair = (int(m.group(1)), int(m.group(2) or m.group(1)))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise wrong_type(ctx, path, value, expected)
    if min(pair) < 1:
        raise ctx.error(path, f"{value!r} is out of range: each {what} must be ≥ 1.")
    return pair


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
        if k == (1, 1):
            raise ctx.error((*path, "kernel_size", i) if isinstance(data.get("kernel_size"), list) else
                            (*path, "kernel_size"), "1x1 convs are already pointwise: there is nothing to "
                            "separate. Remove '1x1'.")
    groups_raw = data.get("groups", [1])
    groups_items = groups_raw if isinstance(groups_raw, list) else [groups_raw]
    for i, g in enumerate(groups_items):
        where = (*path, "groups", i) if groups_items is groups_raw else (*path, "groups")
        int_value(ctx, where, g, minimum=1)
        if g != 1:
            raise ctx.error(where, f"{g!r} is not supported: only dense convs can be separated; "
                            "valid options: 1.")
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
        groups=(1,),
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
