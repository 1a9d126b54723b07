# SPDX-License-Identifier: Apache-2.0
"""MAC and parameter counts from shapes, cross-checked with ``torch.utils.flop_counter``.

What is counted (the unit is the MAC, one multiply-accumulate; FLOPs = 2×MACs):

* every convolution module (``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``, any
  ``groups``, ``stride``, ``dilation``, ``padding``) and every ``nn.Linear``,
  from the shapes seen by forward hooks during one forward pass, bias excluded:

  - conv: ``out.numel() × (C_in / groups) × prod(kernel)``
  - transposed conv: ``in.numel() × (C_out / groups) × prod(kernel)``
  - linear: ``out.numel() × in_features``

  A module called several times sums its calls. The batch size of the example
  input is part of the count.
* parameters: ``numel`` of a module's parameters (bias included); model totals
  count every parameter of the model once.

Not counted: BatchNorm, activations, element-wise add/mul, cat, interpolate,
pooling, softmax, and any conv/matmul done functionally (``F.conv2d`` in a
custom ``forward``, attention). :func:`flop_counter_check` runs PyTorch's
``FlopCounterMode`` over the same forward and warns, naming the module, when it
sees conv/matmul work that no conv or linear module accounts for.

The model is run in eval mode under ``no_grad``; hooks are removed and every
submodule's train flag is restored afterwards, so the model is not changed.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1, bias=False))
    >>> costs = count_costs(model, torch.zeros(1, 64, 56, 56))
    >>> costs.total_macs, costs.total_params
    (231211008, 73728)
    >>> costs.modules["0"].input_shape
    (1, 64, 56, 56)
"""

from __future__ import annotations

import contextlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from math import prod
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import PlanError, did_you_mean
from ..runtime.conv_weight import raw_weight
from ..runtime.run import evaluating, first_tensor, run_model

__all__ = [
    "ModuleCost",
    "LayerCost",
    "ModelCosts",
    "FlopCheck",
    "ROOT_REGION",
    "NOT_COUNTED",
    "is_counted_module",
    "module_macs",
    "count_params",
    "count_costs",
    "layer_costs",
    "region_of",
    "region_costs",
    "flop_counter_check",
    "measure",
]

#: Region name for modules and parameters that sit directly on the model's root.
ROOT_REGION = "(root)"

#: What the counts leave out, in words, for reports.
NOT_COUNTED = (
    "not counted: BatchNorm, activations, element-wise add/mul, cat, interpolate/upsample, "
    "pooling, softmax, and convs/matmuls called functionally outside conv/linear modules"
)


# --------------------------------------------------------------------------------------
# Per-module formulas
# --------------------------------------------------------------------------------------
def is_counted_module(module: nn.Module) -> bool:
    """True for modules whose MACs are counted: every conv (``_ConvNd``) and ``nn.Linear``.

    Example:
        >>> is_counted_module(nn.ConvTranspose3d(2, 2, 3)), is_counted_module(nn.BatchNorm2d(2))
        (True, False)
    """
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))


def module_macs(module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
    """MACs of one call of a conv or linear module, bias excluded, from its shapes.

    Example:
        >>> module_macs(nn.Conv2d(64, 128, 3, padding=1), (1, 64, 56, 56), (1, 128, 56, 56))
        231211008
        >>> module_macs(nn.ConvTranspose2d(8, 4, 2, stride=2), (1, 8, 5, 5), (1, 4, 10, 10))
        3200
        >>> module_macs(nn.Linear(10, 3), (2, 7, 10), (2, 7, 3))
        420
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        w = raw_weight(module).shape  # (a parametrized weight is not computed) conv: (C_out, C_in/g, *k); transposed: (C_in, C_out/g, *k)
        per = int(w[1]) * prod(int(k) for k in w[2:])
        return (prod(input_shape) if module.transposed else prod(output_shape)) * per
    if isinstance(module, nn.Linear):
        return prod(output_shape) * int(raw_weight(module).shape[1])
    raise TypeError(f"no MAC formula for {type(module).__name__}; only convs and nn.Linear are counted")


def _numel(params: Iterable[nn.Parameter]) -> int:
    return sum(int(p.numel()) for p in params)


def count_params(model: nn.Module) -> int:
    """All parameters of ``model``, each counted once (no forward; works on the meta device).

    Example:
        >>> count_params(nn.Conv2d(64, 128, 3, bias=False))
        73728
    """
    return _numel(model.parameters())


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleCost:
    """One conv or linear module: MACs summed over ``calls``; shapes of the first call."""

    name: str
    kind: str
    macs: int
    params: int
    calls: int
    input_shape: Optional[tuple[int, ...]] = None
    output_shape: Optional[tuple[int, ...]] = None


@dataclass(frozen=True)
class LayerCost:
    """A layer of interest: every conv/linear inside it aggregated (e.g. depthwise + pointwise)."""

    name: str
    kind: str
    macs: int
    params: int
    counted_modules: tuple[str, ...] = ()

    @property
    def flops(self) -> int:
        """FLOPs = 2×MACs."""
        return 2 * self.macs


@dataclass(frozen=True)
class FlopCheck:
    """``FlopCounterMode``'s view of the same forward.

    ``macs`` is FlopCounterMode's total / 2; ``unaccounted_macs`` the part of it
    done outside any conv/linear module, per module qualified name and op in
    ``unaccounted``; ``warning`` says so in words (``None`` when all is accounted).
    """

    macs: int
    flops: int
    counted_macs: int
    unaccounted_macs: int
    unaccounted: tuple[tuple[str, str, int], ...] = ()
    warning: Optional[str] = None


@dataclass(frozen=True)
class ModelCosts:
    """Costs of one model on one example input.

    ``modules`` holds every conv/linear module by qualified name (``calls == 0``
    when it did not run); ``total_macs`` their sum; ``total_params`` every
    parameter of the model once. ``check`` is the FlopCounterMode cross-check
    when it was run.
    """

    modules: dict[str, ModuleCost]
    total_macs: int
    total_params: int
    input_shape: Optional[tuple[int, ...]] = None
    check: Optional[FlopCheck] = None
    _ids: dict[int, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def total_flops(self) -> int:
        """FLOPs = 2×MACs."""
        return 2 * self.total_macs


# --------------------------------------------------------------------------------------
# The traced forward
# --------------------------------------------------------------------------------------
class _Frame:
    __slots__ = ("name", "counted", "entry", "children")

    def __init__(self, name: str, counted: bool, entry: Counter[str]) -> None:
        self.name, self.counted, self.entry = name, counted, entry
        self.children: Counter[str] = Counter()


def measure(model: nn.Module, example_inputs: Any, *, cross_check: bool = True) -> ModelCosts:
    """Count every conv/linear module's MACs in one forward; optionally cross-check with FlopCounterMode.

    The forward runs once, in eval mode under ``no_grad``; with ``cross_check``
    it runs inside ``FlopCounterMode`` and the work FlopCounterMode sees is
    attributed to the innermost running module, so that work outside conv/linear
    modules can be named in :attr:`FlopCheck.warning`.

    Raises:
        InputShapeError: the model cannot run on ``example_inputs``.

    Example:
        >>> m = nn.Sequential(nn.Conv1d(4, 8, 3, groups=2, dilation=2), nn.Flatten(), nn.Linear(8 * 6, 5))
        >>> c = measure(m, torch.zeros(2, 4, 10))
        >>> c.modules["0"].macs, c.modules["2"].macs, c.check.macs, c.check.warning is None
        (576, 480, 1056, True)
    """
    names: dict[int, str] = {}
    for name, mod in model.named_modules():
        names.setdefault(id(mod), name)
    counted = {i: n for i, n in names.items() if is_counted_module(model.get_submodule(n))}
    shapes: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = defaultdict(list)
    counter = FlopCounterMode(display=False) if cross_check else None
    stack: list[_Frame] = []
    own: dict[tuple[str, str], int] = defaultdict(int)  # (module, op) -> FLOPs done in it, not in children
    inside_counted: Counter[str] = Counter()

    def now() -> Counter[str]:
        assert counter is not None
        return Counter({str(k): int(v) for k, v in counter.flop_counts["Global"].items()})

    def pre_hook(mod: nn.Module, args: Any) -> None:
        if counter is not None:
            stack.append(_Frame(names[id(mod)], id(mod) in counted, now()))

    def post_hook(mod: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        if id(mod) in counted:
            x = first_tensor(args) if args else first_tensor(list(kwargs.values()))
            y = first_tensor(out)
            if x is not None and y is not None:
                shapes[id(mod)].append((tuple(x.shape), tuple(y.shape)))
        if counter is not None and stack and stack[-1].name == names[id(mod)]:
            frame = stack.pop()
            delta = now() - frame.entry
            for op, v in (delta - frame.children).items():
                own[(frame.name, op)] += v
            if frame.counted:
                inside_counted.update(delta)
            if stack:
                stack[-1].children.update(delta)

    handles = []
    try:
        for i, name in names.items():
            mod = model.get_submodule(name)
            if counter is not None:
                handles.append(mod.register_forward_pre_hook(pre_hook))
            if counter is not None or i in counted:
                handles.append(mod.register_forward_hook(post_hook, with_kwargs=True))
        with evaluating(model), torch.no_grad():
            with counter if counter is not None else contextlib.nullcontext():
                run_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()

    modules: dict[str, ModuleCost] = {}
    for i, name in counted.items():
        mod = model.get_submodule(name)
        calls = shapes.get(i, [])
        modules[name] = ModuleCost(
            name=name,
            kind=type(mod).__name__,
            macs=sum(module_macs(mod, a, b) for a, b in calls),
            params=_numel(mod.parameters()),
            calls=len(calls),
            input_shape=calls[0][0] if calls else None,
            output_shape=calls[0][1] if calls else None,
        )
    total = sum(c.macs for c in modules.values())
    check = _make_check(counter, own, inside_counted, counted, total) if counter is not None else None
    first = first_tensor(example_inputs if not isinstance(example_inputs, Mapping) else list(example_inputs.values()))
    return ModelCosts(
        modules=modules,
        total_macs=total,
        total_params=count_params(model),
        input_shape=tuple(first.shape) if first is not None else None,
        check=check,
        _ids={i: n for i, n in counted.items()},
    )


def _make_check(
    counter: FlopCounterMode,
    own: Mapping[tuple[str, str], int],
    inside_counted: Counter[str],
    counted: Mapping[int, str],
    hook_macs: int,
) -> FlopCheck:
    flops = int(counter.get_total_flops())
    counted_names = set(counted.values())
    outside = sorted(
        ((name, op, v // 2) for (name, op), v in own.items() if v > 0 and name not in counted_names),
        key=lambda t: -t[2],
    )
    outside_flops = flops - sum(inside_counted.values())
    unaccounted = max(0, outside_flops) // 2
    warning = None
    if unaccounted > 0:
        where = ", ".join(f"{n or ROOT_REGION} ({op.removeprefix('aten.')}: {m:,} MACs)" for n, op, m in outside[:5])
        more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
        warning = (
            f"FlopCounterMode found {unaccounted:,} MACs ({2 * unaccounted:,} FLOPs) of conv/matmul work that "
            f"no conv or linear module accounts for, in: {where}{more}. It is not in the MAC totals. "
            "Hint: it comes from functional calls (F.conv2d, F.linear, torch.matmul, attention) inside a "
            "custom forward; dsrewrite can neither count nor replace them."
        )
    elif flops // 2 != hook_macs:
        warning = (
            f"FlopCounterMode counts {flops // 2:,} MACs where the module hooks count {hook_macs:,}: "
            "a conv or linear subclass does work its shapes do not show."
        )
    return FlopCheck(
        macs=flops // 2,
        flops=flops,
        counted_macs=hook_macs,
        unaccounted_macs=unaccounted,
        unaccounted=tuple(outside),
        warning=warning,
    )


def count_costs(model: nn.Module, example_inputs: Any) -> ModelCosts:
    """Every conv/linear module's MACs and params from one forward (no FlopCounterMode).

    Example:
        >>> c = count_costs(nn.Linear(10, 3), torch.zeros(4, 10))
        >>> c.total_macs, c.total_params
        (120, 33)
    """
    return measure(model, example_inputs, cross_check=False)


def flop_counter_check(model: nn.Module, example_inputs: Any) -> FlopCheck:
    """FlopCounterMode's total / 2 for one forward, and a warning for uncounted conv/matmul work.

    Example:
        >>> import torch.nn.functional as F
        >>> class Functional(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = nn.Parameter(torch.zeros(8, 4, 3, 3))
        ...     def forward(self, x):
        ...         return F.conv2d(x, self.w)
        >>> chk = flop_counter_check(Functional(), torch.zeros(1, 4, 10, 10))
        >>> chk.macs, chk.unaccounted_macs, chk.warning.startswith("FlopCounterMode found 18,432 MACs")
        (18432, 18432, True)
    """
    check = measure(model, example_inputs, cross_check=True).check
    assert check is not None  # cross_check=True always sets it
    return check


# --------------------------------------------------------------------------------------
# Aggregation: layers of interest and regions
# --------------------------------------------------------------------------------------
def layer_costs(model: nn.Module, costs: ModelCosts, names: Iterable[str]) -> dict[str, LayerCost]:
    """Costs of the named submodules, each aggregating every conv/linear inside it.

    A ``DepthwiseSeparableConv2d`` costs its depthwise + pointwise stages; its
    params include everything it holds (e.g. a middle BatchNorm).

    Raises:
        PlanError: a name is not a submodule of ``model``.

    Example:
        >>> from dsrewrite.layers import DepthwiseSeparableConv2d
        >>> m = nn.Sequential(DepthwiseSeparableConv2d.from_conv(nn.Conv2d(64, 128, 3, padding=1, bias=False)))
        >>> lc = layer_costs(m, count_costs(m, torch.zeros(1, 64, 56, 56)), ["0"])["0"]
        >>> lc.macs, lc.params, lc.counted_modules
        (27496448, 8768, ('0.depthwise', '0.pointwise'))
    """
    known = {n for n, _ in model.named_modules(remove_duplicate=False)}
    out: dict[str, LayerCost] = {}
    for name in names:
        if name not in known:
            raise PlanError(
                f"no submodule {name!r} in {type(model).__name__}{did_you_mean(name, known)}. "
                "Hint: the plan was made for another model; re-plan on this one."
            )
        sub = model.get_submodule(name)
        inner: list[str] = []
        for mod in sub.modules():
            qn = costs._ids.get(id(mod))
            if qn is not None and qn not in inner:
                inner.append(qn)
        out[name] = LayerCost(
            name=name,
            kind=type(sub).__name__,
            macs=sum(costs.modules[q].macs for q in inner),
            params=_numel(sub.parameters()),
            counted_modules=tuple(inner),
        )
    return out


def region_of(name: str) -> str:
    """The region of a qualified module or parameter name: its first component.

    Example:
        >>> region_of("decoder.blocks.0.conv1"), region_of("")
        ('decoder', '(root)')
    """
    return name.split(".", 1)[0] if name else ROOT_REGION


def region_costs(model: nn.Module, costs: ModelCosts) -> dict[str, tuple[int, int]]:
    """``{region: (params, macs)}`` over the whole model, regions being top-level children.

    Every parameter and every counted MAC lands in exactly one region, so the
    regions sum to the model totals. Parameters and modules held by the root
    itself go to ``'(root)'``. Regions come in the order of the model's children.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> region_costs(m, count_costs(m, torch.zeros(1, 3, 8, 8)))
        {'0': (224, 7776), '1': (0, 0), '2': (584, 9216)}
    """
    regions: dict[str, list[int]] = {n: [0, 0] for n, _ in model.named_children()}
    for pname, p in model.named_parameters():
        regions.setdefault(region_of(pname) if "." in pname else ROOT_REGION, [0, 0])[0] += int(p.numel())
    for name, c in costs.modules.items():
        regions.setdefault(region_of(name), [0, 0])[1] += c.macs
    return {k: (v[0], v[1]) for k, v in regions.items()}
