# SPDX-License-Identifier: Apache-2.0
"""Recipe records: frozen, typed, validated once by :mod:`dsrewrite.recipe.validate`.

A :class:`Recipe` says which convs to select (:class:`Selector`) and what to put
in their place (:class:`ReplaceSpec`), with per-name :class:`Override` rules.
Records are plain values: build them by loading a recipe, not by hand.

Example:
    >>> spec = ReplaceSpec(order="dw_pw", depth_multiplier=1)
    >>> spec.with_changes(energy=0.9)
    ReplaceSpec(order='dw_pw', depth_multiplier=None, energy=0.9, init='svd', mid_norm=None, mid_act=None, auto_order='macs')
    >>> Range(min=16).describe()
    '≥ 16'
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import FrozenInstanceError, dataclass, field, replace
from typing import Any, Literal, Optional

from . import choices
from .regex_cost import compile_checked
from .choices import (
    AUTO,
    AUTO_ORDERS,
    INITS,
    MID_ACT_NAMES,
    MID_NORMS,
    order_choices,
    order_json_schema,
    predicate_keys,
)
from .replace_keys import parse_replace_changes

__all__ = [
    "ORDERS",
    "AUTO",
    "order_choices",
    "order_json_schema",
    "AUTO_ORDERS",
    "LatencySpec",
    "INITS",
    "MID_NORMS",
    "MID_ACT_NAMES",
    "PREDICATE_KEYS",
    "predicate_keys",
    "Kernel",
    "kernel_str",
    "Range",
    "NamePattern",
    "GraphPredicates",
    "Selector",
    "ReplaceSpec",
    "ReplacePatch",
    "Override",
    "Recipe",
]

Kernel = tuple[int, ...]


def kernel_str(k: tuple[int, ...]) -> str:
    """``(3, 3)`` → ``'3×3'`` (any length).

    Example:
        >>> kernel_str((3, 1))
        '3×1'
    """
    return "×".join(str(int(v)) for v in k)


def __getattr__(name: str) -> Any:
    if name in ("ORDERS", "PREDICATE_KEYS"):  # read on access from the registries
        return getattr(choices, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


@dataclass(frozen=True)
class Range:
    """An inclusive numeric interval; ``None`` bounds are open.

    Example:
        >>> Range(min=16).contains(8), Range(max=4).contains(4.0)
        (False, True)
    """

    min: Optional[float] = None
    max: Optional[float] = None

    @property
    def unbounded(self) -> bool:
        return self.min is None and self.max is None

    def contains(self, value: float) -> bool:
        if self.min is not None and value < self.min:
            return False
        return self.max is None or value <= self.max

    def describe(self) -> str:
        """Human form: ``'≥ 16'``, ``'≤ 4'``, ``'16..64'``, ``'= 8'`` or ``'any'``."""
        if self.min is not None and self.max is not None:
            return f"= {_num(self.min)}" if self.min == self.max else f"{_num(self.min)}..{_num(self.max)}"
        if self.min is not None:
            return f"≥ {_num(self.min)}"
        if self.max is not None:
            return f"≤ {_num(self.max)}"
        return "any"


@dataclass(frozen=True)
class NamePattern:
    """A qualified-name pattern: a glob (``decoder.*``) or, prefixed ``re:``, a regex.

    A pattern matches a conv when it matches the conv's qualified name *or the
    name of a module containing it* (``decoder.blocks.0`` matches
    ``decoder.blocks.0.conv1.0``). Regexes, like globs, must match a whole name
    (``re.fullmatch``).

    Example:
        >>> NamePattern("decoder.blocks.0").matches("decoder.blocks.0.conv1.0")
        True
        >>> NamePattern(r"re:decoder\\.blocks\\.[2-4]\\..*").matches("decoder.blocks.1.conv1.0")
        False
    """

    text: str
    _regex: Optional["re.Pattern[str]"] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.is_regex:
            object.__setattr__(self, "_regex", compile_checked(self.text[3:]))  # costly shapes refused

    @property
    def is_regex(self) -> bool:
        return self.text.startswith("re:")

    def _match_one(self, name: str) -> bool:
        if self._regex is not None:
            return self._regex.fullmatch(name) is not None
        return fnmatch.fnmatchcase(name, self.text)

    def matches(self, name: str) -> bool:
        parts = name.split(".")
        return any(self._match_one(".".join(parts[:i])) for i in range(len(parts), 0, -1))


class GraphPredicates:
    """Required values of the graph predicates (:mod:`dsrewrite.predicates`); ``None`` means "don't care".

    A frozen value: keyword arguments name registered predicates; each is readable as an
    attribute (``None`` when not required).

    Example:
        >>> GraphPredicates(after_concat=True).required()
        (('after_concat', True),)
        >>> GraphPredicates(after_concat=True).after_upsample is None
        True
    """

    __slots__ = ("_values",)

    def __init__(self, **values: Optional[bool]) -> None:
        known = predicate_keys()
        for key in values:
            if key not in known:
                raise TypeError(f"GraphPredicates() got an unexpected keyword argument {key!r} "
                                f"(graph predicates: {', '.join(known)})")
        object.__setattr__(self, "_values", tuple((k, v) for k, v in values.items() if v is not None))

    def __setattr__(self, name: str, value: Any) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_"):
            values = dict(object.__getattribute__(self, "_values"))
            if name in values or name in predicate_keys():
                return values.get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def values(self) -> dict[str, bool]:
        """The required values given (name → ``True``/``False``)."""
        return dict(self._values)

    def required(self) -> tuple[tuple[str, bool], ...]:
        """The ``(predicate, value)`` pairs that are not "don't care", in check (registry) order."""
        given = dict(self._values)
        order = [*predicate_keys(), *(k for k in given if k not in predicate_keys())]
        return tuple((k, given[k]) for k in order if k in given)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GraphPredicates) and dict(self._values) == dict(other._values)

    def __hash__(self) -> int:
        return hash(frozenset(self._values))

    def __repr__(self) -> str:
        return f"GraphPredicates({', '.join(f'{k}={v!r}' for k, v in self.required())})"

    def __reduce__(self) -> Any:
        return (_graph_predicates, (dict(self._values),))


def _graph_predicates(values: dict[str, bool]) -> GraphPredicates:
    return GraphPredicates(**values)


@dataclass(frozen=True)
class Selector:
    """Which convs a recipe selects (the ``select:`` section).

    ``None`` for ``kernel_sizes``/``strides``/``dilations``/``regions``/``spatial_dims``
    means "any"; ``groups=None`` accepts dense and grouped convs, ``transposed=None``
    regular and transposed ones (the defaults: dense regular convs only).
    ``when_no_region_matches`` replaces the region test when no conv of the model lies
    in any of ``regions``.
    """

    kernel_sizes: Optional[tuple[Kernel, ...]] = None
    groups: Optional[tuple[int, ...]] = (1,)
    spatial_dims: Optional[tuple[int, ...]] = None
    transposed: Optional[bool] = False
    in_channels: Range = Range()
    out_channels: Range = Range()
    strides: Optional[tuple[Kernel, ...]] = None
    dilations: Optional[tuple[Kernel, ...]] = None
    regions: Optional[tuple[str, ...]] = None
    when_no_region_matches: Optional[GraphPredicates] = None
    include: tuple[NamePattern, ...] = ()
    exclude: tuple[NamePattern, ...] = ()
    output_stride: Range = Range()
    graph: GraphPredicates = GraphPredicates()


@dataclass(frozen=True)
class ReplaceSpec:
    """What replaces one selected conv (the ``replace:`` section).

    Exactly one of ``depth_multiplier`` (a fixed ``m ≥ 1``) and ``energy`` (the
    smallest ``m`` keeping that fraction of the squared singular values, in
    ``(0, 1]``) is set. ``order`` names a registered kind (:mod:`dsrewrite.kinds`);
    ``order="auto"`` is resolved per conv by the planner.
    """

    order: str = "dw_pw"  # a registered kind's name, or "auto"
    depth_multiplier: Optional[int] = 1
    energy: Optional[float] = None
    init: Literal["svd", "random"] = "svd"
    mid_norm: Optional[str] = None
    mid_act: Optional[str] = None
    auto_order: Literal["macs", "error", "measured"] = "macs"

    def with_changes(self, **changes: Any) -> "ReplaceSpec":
        """A copy with ``changes`` applied; setting ``depth_multiplier`` clears ``energy`` and vice versa.

        Values are not validated here: use :meth:`Recipe.with_overrides` for user input.
        """
        if changes.get("depth_multiplier") is not None:
            changes.setdefault("energy", None)
        if changes.get("energy") is not None:
            changes.setdefault("depth_multiplier", None)
        return replace(self, **changes)

    def describe(self) -> str:
        """Short form, e.g. ``'dw_pw m=1 init=svd'`` or ``'auto energy=0.9 init=svd mid=batchnorm/relu'``."""
        rank = f"m={self.depth_multiplier}" if self.energy is None else f"energy={self.energy:g}"
        order = self.order if self.order != AUTO or self.auto_order == "macs" else f"{AUTO}({self.auto_order})"
        text = f"{order} {rank} init={self.init}"
        if self.mid_norm or self.mid_act:
            text += f" mid={self.mid_norm or '-'}/{self.mid_act or '-'}"
        return text


@dataclass(frozen=True)
class ReplacePatch:
    """The keys an override sets on top of the recipe's :class:`ReplaceSpec`.

    ``values`` holds the ``(key, value)`` pairs given (``None`` is a
    value: ``mid_act: null`` switches the activation off).

    Example:
        >>> ReplacePatch((("depth_multiplier", 2),)).apply(ReplaceSpec(energy=0.9, depth_multiplier=None))
        ReplaceSpec(order='dw_pw', depth_multiplier=2, energy=None, init='svd', mid_norm=None, mid_act=None, auto_order='macs')
    """

    values: tuple[tuple[str, Any], ...] = ()

    def apply(self, base: ReplaceSpec) -> ReplaceSpec:
        return base.with_changes(**dict(self.values))

    def describe(self) -> str:
        short = {"depth_multiplier": "m"}
        return ", ".join(f"{short.get(k, k)}={v}" for k, v in self.values)


@dataclass(frozen=True)
class Override:
    """``overrides[i]``: convs whose name matches any of ``match`` get ``replace`` applied, or are skipped.

    The first override that matches a conv wins.
    """

    index: int
    match: tuple[NamePattern, ...]
    replace: ReplacePatch = ReplacePatch()
    skip: bool = False

    def matches(self, name: str) -> bool:
        return any(p.matches(name) for p in self.match)

    def label(self) -> str:
        pats = ", ".join(repr(p.text) for p in self.match)
        return f"overrides[{self.index}] ({pats})"


@dataclass(frozen=True)
class LatencySpec:
    """Latency-aware selection (the ``latency:`` section).

    Each selected conv is timed, dense against its separable replacement, at its real
    input shape on the model's device, interleaved (medians of per-round ratios); it is
    kept dense unless the separable block is at least ``min_speedup`` times faster.
    """

    min_speedup: float = 1.05
    rounds: int = 15
    warmup: int = 3
    channels_last: bool = False


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``source`` says where it came from (a path, ``builtin:NAME`` or ``<mapping>``)."""

    name: str
    description: str = ""
    source: str = "<mapping>"
    select: Selector = Selector()
    replace: ReplaceSpec = ReplaceSpec()
    overrides: tuple[Override, ...] = ()
    latency: Optional[LatencySpec] = None
    #: The ``budget:`` section (a :class:`dsrewrite.budget.types.Budget`), or ``None``.
    budget: Optional[Any] = None

    def with_overrides(
        self,
        *,
        depth_multiplier: Optional[int] = None,
        energy: Optional[float] = None,
        order: Optional[str] = None,
        init: Optional[str] = None,
    ) -> "Recipe":
        """A copy whose ``replace`` section takes these values (``None`` keeps the recipe's).

        This is what the CLI's ``--depth-multiplier``/``--energy``/``--order``/``--init``
        do. Per-name overrides that set the same key keep their own value.

        Raises:
            RecipeError: an invalid value (e.g. ``depth_multiplier=0``, both
                ``depth_multiplier`` and ``energy``).

        Example:
            >>> from dsrewrite.recipe import load_recipe
            >>> load_recipe("decoder_only").with_overrides(depth_multiplier=2, order="auto").replace.describe()
            'auto m=2 init=svd'
        """
        changes = parse_replace_changes(
            {"depth_multiplier": depth_multiplier, "energy": energy, "order": order, "init": init},
            source=f"{self.source} (with overrides)",
        )
        if not changes:
            return self
        return replace(self, replace=self.replace.with_changes(**changes))
