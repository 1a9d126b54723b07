# SPDX-License-Identifier: Apache-2.0
"""Building a report: measure the original and the rewritten model and group the costs per layer, region and total.

:func:`build_report` measures both models on the example input (see
:mod:`dsrewrite.macs` for what is counted: conv and linear MACs, bias excluded;
FLOPs = 2×MACs), groups the costs per plan layer, per region (top-level child)
and in total, compares outputs (:mod:`dsrewrite.fidelity`) and, on request,
latency (:mod:`dsrewrite.latency`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dsrewrite.layers import DepthwiseSeparableConv2d
    >>> from dsrewrite.plan_types import LayerConfig, Plan, PlanEntry
    >>> model = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1, bias=False))
    >>> rewritten = nn.Sequential(DepthwiseSeparableConv2d.from_conv(model[0]))
    >>> plan = Plan(entries=(PlanEntry("0", "replace", "3×3", LayerConfig()),), recipe="all_3x3", capture="fx")
    >>> rep = build_report(model, rewritten, plan, torch.randn(1, 64, 56, 56))
    >>> rep.totals_before.macs, rep.totals_after.macs, rep.totals_after.params
    (231211008, 27496448, 8768)
    >>> round(rep.to_dict()["totals"]["reduction"]["macs"]["factor"], 2)
    8.41
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional

from torch import Tensor, nn

from ..fidelity import Fidelity, compare_outputs
from ..latency import LatencyComparison, compare_latency
from ..macs import ModelCosts, layer_costs, measure, region_costs, region_of
from ..plan_types import Plan
from .records import Cost, LayerRow, RegionRow, Report

__all__ = ["build_report", "build_plan_report"]


def _shape(value: Any) -> Optional[tuple[int, ...]]:
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else None


def _check_warnings(before: ModelCosts, after: Optional[ModelCosts]) -> list[str]:
    wa = before.check.warning if before.check else None
    wb = after.check.warning if after is not None and after.check else None
    if after is None:
        return [wa] if wa else []
    if wa and wa == wb:
        return [f"both models: {wa}"]
    return [f"{who} model: {w}" for who, w in (("original", wa), ("rewritten", wb)) if w]


def build_report(
    original: nn.Module,
    rewritten: nn.Module,
    plan: Plan,
    example_inputs: Any,
    *,
    calibration_inputs: Optional[Iterable[Any]] = None,
    benchmark: bool = False,
    benchmark_rounds: int = 20,
    benchmark_warmup: int = 3,
) -> Report:
    """Measure ``original`` and ``rewritten`` on ``example_inputs`` and report per plan layer, region and total.

    ``build_report(model, model, plan, x)`` (the same object twice) gives a
    "model only" report: before == after, no fidelity, no latency. Fidelity is
    measured on ``example_inputs`` (one batch: a tensor, a tuple of positional
    args or a dict of kwargs) and, when given, on ``calibration_inputs`` (an
    iterable of batches). ``benchmark=True`` times both models interleaved, eager
    NCHW and channels_last, ``benchmark_rounds`` rounds each. Neither model is changed.

    Raises:
        PlanError: a plan entry names no submodule of the models.
        InputShapeError: a model cannot run on ``example_inputs``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dsrewrite.plan_types import Plan, PlanEntry
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> p = Plan(entries=(PlanEntry("2", "skip", "not in the decoder"),), recipe="decoder_only", capture="fx")
        >>> rep = build_report(net, net, p, torch.randn(1, 3, 16, 16))
        >>> rep.kind, rep.totals_before == rep.totals_after, rep.layers[0].before.macs
        ('model', True, 82944)
    """
    same = rewritten is original
    costs_a = measure(original, example_inputs)
    costs_b = costs_a if same else measure(rewritten, example_inputs)
    names = list(dict.fromkeys(e.name for e in plan.entries))
    la = layer_costs(original, costs_a, names)
    lb = la if same else layer_costs(rewritten, costs_b, names)

    layers: list[LayerRow] = []
    warnings = _check_warnings(costs_a, None if same else costs_b)
    for e in plan.entries:
        fact = e.fact or {}
        first = costs_a.modules.get(e.name)
        row = LayerRow(
            name=e.name,
            region=str(fact.get("region") or region_of(e.name)),
            replaced=e.replaced,
            reason=e.reason,
            config=dataclasses.asdict(e.config) if e.config is not None else None,
            before=Cost(la[e.name].params, la[e.name].macs),
            after=Cost(lb[e.name].params, lb[e.name].macs),
            kind_before=la[e.name].kind,
            kind_after=lb[e.name].kind,
            input_shape=_shape(fact.get("input_shape")) or (first.input_shape if first else None),
            output_shape=_shape(fact.get("output_shape")) or (first.output_shape if first else None),
        )
        layers.append(row)
        if not same and row.replaced and row.kind_after == row.kind_before:
            warnings.append(
                f"plan says replace {e.name!r} but the rewritten model still holds a {row.kind_after} there. "
                "Hint: apply the plan to the model (dsrewrite.apply.apply_plan) before reporting."
            )
        if not same and not row.replaced and row.after != row.before:
            warnings.append(f"plan says skip {e.name!r} but its cost changed in the rewritten model.")

    def part(lc: dict) -> Cost:
        return Cost(sum(lc[n].params for n in names), sum(lc[n].macs for n in names))

    totals_a = Cost(costs_a.total_params, costs_a.total_macs)
    totals_b = Cost(costs_b.total_params, costs_b.total_macs)
    ra, rb = region_costs(original, costs_a), region_costs(rewritten, costs_b)
    regions = tuple(
        RegionRow(r, Cost(*ra.get(r, (0, 0))), Cost(*rb.get(r, (0, 0))))
        for r in dict.fromkeys([*ra, *rb])
    )

    fidelity: dict[str, Fidelity] = {}
    latency: dict[str, LatencyComparison] = {}
    notes: list[str] = []
    if not same:
        replaced = [e.name for e in plan.replaced]  # where to compare when the outputs do not pair up
        fidelity["example"] = compare_outputs(original, rewritten, [example_inputs], replaced=replaced)
        if calibration_inputs is not None:
            fidelity["calibration"] = compare_outputs(original, rewritten, calibration_inputs, replaced=replaced)
        if benchmark:
            kw = {"rounds": benchmark_rounds, "warmup": benchmark_warmup}
            latency["eager_nchw"] = compare_latency(original, rewritten, example_inputs, **kw)
            first_t = example_inputs if isinstance(example_inputs, Tensor) else None
            if first_t is not None and first_t.dim() in (4, 5):
                latency["channels_last"] = compare_latency(
                    original, rewritten, example_inputs, channels_last=True, **kw
                )
            else:
                notes.append("channels_last latency not measured: it needs a single 4-d or 5-d input tensor.")
    elif benchmark:
        notes.append("no latency measured: a model-only report has nothing to compare.")

    return Report(
        kind="model" if same else "rewrite",
        model=type(original).__name__,
        recipe=plan.recipe,
        capture=plan.capture,
        input_shape=costs_a.input_shape,
        layers=tuple(layers),
        regions=regions,
        totals_before=totals_a,
        totals_after=totals_b,
        other_before=totals_a - part(la),
        other_after=totals_b - part(lb),
        plan_notes=tuple(plan.notes),
        warnings=tuple(warnings),
        notes=tuple(notes),
        fidelity=fidelity,
        latency=latency,
    )


def build_plan_report(model: nn.Module, plan: Plan, example_inputs: Any) -> Report:
    """A "model only" report (no rewrite: before == after) of ``model`` with the plan's decisions.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dsrewrite.plan_types import Plan
        >>> rep = build_plan_report(nn.Conv2d(3, 4, 3), Plan((), "all_3x3", "fx"), torch.zeros(1, 3, 5, 5))
        >>> rep.kind, rep.totals_before.macs, [r.name for r in rep.regions]
        ('model', 972, ['(root)'])
    """
    return build_report(model, model, plan, example_inputs)
