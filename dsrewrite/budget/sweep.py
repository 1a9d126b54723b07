# SPDX-License-Identifier: Apache-2.0
"""The Pareto curve: MACs against predicted and measured output error over a range of budgets.

:func:`budget_sweep` computes the candidates and the sensitivity ONCE, then allocates for every
budget (cheap), and, when asked, carries out each plan, calibrates it and measures its output
error (the expensive part: one calibration per point). The uniform configurations (every selected
conv at ``m`` with one kind) and the built-in recipes are measured the same way and marked as
such, so that one table (and one plot, :func:`save_sweep_plot`) compares them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
    ...                     nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    >>> x = torch.randn(4, 3, 16, 16)
    >>> pts = budget_sweep(net, "all_3x3", x[:1], [x], fractions=(0.5, 0.8), uniform=(1,), recipes=())
    >>> [p.label for p in pts if p.series == "uniform"]
    ['uniform dw_pw m=1', 'uniform pw_dw m=1']
    >>> all(p.measured_error is not None for p in pts)
    True
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from torch import nn

from .allocate import Infeasible, Option, allocate
from .planner import BudgetPlan, _build, budget_problem
from .sensitivity import data_sensitivity, weight_sensitivity
from .types import Budget

__all__ = ["SweepPoint", "budget_sweep", "sweep_table", "save_sweep_plot"]


@dataclass(frozen=True)
class SweepPoint:
    """One configuration: ``series`` is ``"budget"`` (planned), ``"uniform"`` or ``"recipe"``.

    ``macs``/``params``: counted on the rewritten model (planned totals when not carried out);
    ``predicted_error``: relative L2 output error the sensitivity predicts (``None`` for a recipe whose
    choices are not among the candidates); ``measured_error``: after calibration, on the calibration inputs;
    ``latency_ratio``: measured latency of the rewritten model over the dense model's at the example input
    (interleaved rounds, median of per-round ratios; ``None`` unless the sweep was asked to time).
    """

    series: str
    label: str
    macs: int
    params: int
    predicted_error: Optional[float]
    measured_error: Optional[float]
    latency_ratio: Optional[float] = None


def _measure(model: nn.Module, plan: Any, x: Any, inputs: Sequence[Any],
             latency_rounds: int = 0) -> tuple[int, int, float, Optional[float]]:
    from ..measure.latency import compare_latency
    from ..measure.macs import count_costs
    from ..planning.apply import apply_checked
    from ..refit.calibrate import calibrate

    light = apply_checked(model, plan, inplace=False)
    res = calibrate(model, light, list(inputs), names=[e.name for e in plan.replaced], example_inputs=x)
    costs = count_costs(light, x)
    ratio = compare_latency(model, light, x, rounds=latency_rounds).ratio if latency_rounds > 0 else None
    return costs.total_macs, costs.total_params, float(res.output_rel_error_after or 0.0), ratio


def budget_sweep(model: nn.Module, recipe: Any, example_inputs: Any, calibration: Optional[Sequence[Any]], *,
                 fractions: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8), uniform: Sequence[int] = (1, 2),
                 recipes: Sequence[str] = ("decoder_only", "all_3x3"), order: Optional[str] = "auto",
                 measure: bool = True, max_positions: int = 4096, gain_images: Optional[int] = None,
                 latency_rounds: int = 0) -> list[SweepPoint]:
    """Planned points for each MAC fraction, then uniform ``m`` (each kind) and ``recipes`` (see the module doc).

    ``calibration``: model inputs; ``None`` gives the weight-space sensitivity and no measured errors.
    A fraction below the cheapest reachable configuration is left out. ``latency_rounds > 0``: every
    measured point is also timed against the dense model (:func:`~dsrewrite.measure.latency.compare_latency`,
    that many interleaved rounds) on this machine, at the example input.
    """
    prob = budget_problem(model, recipe, example_inputs, order=order)
    if calibration:
        sens = data_sensitivity(model, prob.layers, calibration, max_positions=max_positions, gain_images=gain_images)
    else:
        sens = weight_sensitivity(model, prob.layers, example_inputs)
        measure = False
    groups = [[Option(c.macs, e) for c, e in zip(lc.candidates, ls.errors)] for lc, ls in zip(prob.layers, sens.layers)]
    points: list[SweepPoint] = []
    seen: set[tuple[int, ...]] = set()
    for f in sorted(fractions):
        budget = Budget(macs=f, source="sweep")
        limit = budget.absolute("macs", prob.total_macs)
        try:
            alloc = allocate(groups, max_cost=limit - prob.fixed_macs)
        except Infeasible:
            continue
        if alloc.choice in seen:
            continue
        seen.add(alloc.choice)
        bp = _build(prob, sens, alloc, budget, "macs", limit)
        points.append(_point("budget", f"budget {f:g}", bp, model, example_inputs, calibration, measure,
                             latency_rounds))
    by_name = {lc.name: i for i, lc in enumerate(prob.layers)}
    kinds = sorted({c.kind for lc in prob.layers for c in lc.candidates if c.kind is not None})
    for m in uniform:
        for kind in kinds:
            p = _plan(model, recipe, example_inputs, depth_multiplier=m, order=kind)
            pred = _predicted(p, prob, sens, by_name)
            points.append(_plan_point("uniform", f"uniform {kind} m={m}", p, pred, model, example_inputs,
                                      calibration, measure, latency_rounds))
    for name in recipes:
        p = _plan(model, name, example_inputs)
        if not p.replaced:
            continue
        pred = _predicted(p, prob, sens, by_name)
        points.append(_plan_point("recipe", f"recipe {name}", p, pred, model, example_inputs, calibration,
                                  measure, latency_rounds))
    return points


def _plan(model: nn.Module, recipe: Any, x: Any, **overrides: Any) -> Any:
    from ..planning.planner import NothingSelectedWarning, plan_checked

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingSelectedWarning)
        return plan_checked(model, recipe, x, **overrides)


def _predicted(plan: Any, prob: Any, sens: Any, by_name: dict[str, int]) -> Optional[float]:
    """The sensitivity's prediction for an arbitrary plan, when every replaced conv's choice is a candidate."""
    total = 0.0
    for e in plan.replaced:
        i = by_name.get(e.name)
        if i is None or e.config is None:
            return None
        cands = prob.layers[i].candidates
        j = next((j for j, c in enumerate(cands) if c.kind == e.config.order and c.m == e.config.depth_multiplier), None)
        if j is None:
            return None
        total += sens.layers[i].errors[j]
    return math.sqrt(total)


def _point(series: str, label: str, bp: BudgetPlan, model: nn.Module, x: Any, calibration: Any,
           measure: bool, latency_rounds: int) -> SweepPoint:
    if measure:
        macs, params, err, lat = _measure(model, bp.plan, x, calibration, latency_rounds)
        return SweepPoint(series, label, macs, params, bp.predicted_error, err, lat)
    return SweepPoint(series, label, bp.planned_macs, bp.planned_params, bp.predicted_error, None)


def _plan_point(series: str, label: str, plan: Any, pred: Optional[float], model: nn.Module, x: Any,
                calibration: Any, measure: bool, latency_rounds: int) -> SweepPoint:
    if measure:
        macs, params, err, lat = _measure(model, plan, x, calibration, latency_rounds)
        return SweepPoint(series, label, macs, params, pred, err, lat)
    from ..measure.macs import count_costs
    from ..planning.apply import apply_checked

    costs = count_costs(apply_checked(model, plan, inplace=False), x)
    return SweepPoint(series, label, costs.total_macs, costs.total_params, pred, None)


def sweep_table(points: Sequence[SweepPoint], total_macs: Optional[int] = None) -> str:
    """A Markdown table of the points (MACs, share of ``total_macs``, params, predicted and measured error,
    and the measured latency over the dense model's where the sweep timed it)."""
    def num(v: Optional[float]) -> str:
        return "–" if v is None else f"{v:.4f}"

    timed = any(p.latency_ratio is not None for p in points)
    lat_head, lat_rule = (" latency (of dense) |", "---|") if timed else ("", "")
    rows = [f"| series | configuration | MACs | of the model | params | predicted error | measured error |{lat_head}",
            f"|---|---|---|---|---|---|---|{lat_rule}"]
    for p in points:
        share = f"{100.0 * p.macs / total_macs:.1f}%" if total_macs else "–"
        lat = (" – |" if p.latency_ratio is None else f" {p.latency_ratio:.3f} |") if timed else ""
        rows.append(f"| {p.series} | {p.label} | {p.macs:,} | {share} | {p.params:,} | {num(p.predicted_error)} | "
                    f"{num(p.measured_error)} |{lat}")
    return "\n".join(rows)


def save_sweep_plot(points: Sequence[SweepPoint], path: Union[str, os.PathLike], *, title: str = "") -> Path:
    """A PNG of MACs against output error: planned (line, predicted and measured), uniform and recipes (markers).

    Raises:
        PlotUnavailableError: matplotlib is not installed.
        OutputError: the path does not end in ``.png``.
    """
    from ..errors import OutputError
    from ..report.files import write_atomic
    from ..report.plot import PlotUnavailableError

    p = Path(path)
    if p.suffix.lower() != ".png":
        raise OutputError(f"plot path {str(p)!r} must end in .png (got {p.suffix or 'no suffix'!r}).")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is installed here
        raise PlotUnavailableError("the sweep plot needs matplotlib: pip install matplotlib") from exc
    import io

    timed = [q for q in points if q.latency_ratio is not None and q.measured_error is not None]
    fig = Figure(figsize=(14, 5) if timed else (8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if timed else 1, 1)
    planned = [q for q in points if q.series == "budget"]
    xs = [q.macs / 1e6 for q in planned]
    ax.plot(xs, [q.predicted_error for q in planned], "o--", color="tab:blue", label="budget plan: predicted")
    if any(q.measured_error is not None for q in planned):
        ax.plot(xs, [q.measured_error for q in planned], "o-", color="tab:green", label="budget plan: measured")
    styles = {"uniform": ("s", "tab:red"), "recipe": ("^", "tab:purple")}
    for q in points:
        if q.series not in styles or q.measured_error is None:
            continue
        marker, color = styles[q.series]
        ax.plot([q.macs / 1e6], [q.measured_error], marker, color=color)
        ax.annotate(q.label.replace("uniform ", "").replace("recipe ", ""), (q.macs / 1e6, q.measured_error),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    for series, (marker, color) in styles.items():
        ax.plot([], [], marker, color=color, label=f"{series} (measured)")
    ax.set_xlabel("MACs (M) of the whole model")
    ax.set_ylabel("output rel. L2 error after calibration")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    if timed:
        _latency_panel(fig.add_subplot(1, 2, 2), timed)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_atomic(p, buf.getvalue())
    return p


def _latency_panel(ax: Any, points: Sequence[SweepPoint]) -> None:
    """Measured latency (of the dense model's) against measured error, one marker per timed point."""
    styles = {"budget": ("o", "tab:green"), "uniform": ("s", "tab:red"), "recipe": ("^", "tab:purple")}
    for series, (marker, color) in styles.items():
        pts = [q for q in points if q.series == series]
        if not pts:
            continue
        ax.plot([q.latency_ratio for q in pts], [q.measured_error for q in pts], marker, color=color,
                label=f"{series} (measured)")
        for q in pts:
            ax.annotate(q.label.replace("uniform ", "").replace("recipe ", ""), (q.latency_ratio, q.measured_error),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("latency of the whole model / dense (measured here, interleaved)")
    ax.set_ylabel("output rel. L2 error after calibration")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
