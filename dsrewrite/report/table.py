# SPDX-License-Identifier: Apache-2.0
"""The terminal table of a report: the CLI's default output and the ``.txt`` format.

The plan's decision table (:meth:`dsrewrite.plan_types.Plan.table`) and the calibration
table (``CalibrationResult.table()``) are rendered by :func:`render_plan` and
:func:`render_calibration`, which the CLI prints.
"""

from __future__ import annotations

from typing import Any

from ..macs import NOT_COUNTED
from .records import RegionRow, Report
from .text import config_text, factor, fidelity_lines, grid, header, latency_lines, pct, si

__all__ = ["render_table", "render_plan", "render_calibration"]


def render_table(rep: Report) -> str:
    """The readable terminal form of a report (the CLI's default output).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dsrewrite.plan_types import Plan
        >>> from dsrewrite.report import build_plan_report
        >>> rep = build_plan_report(nn.Conv2d(3, 4, 3), Plan((), "all_3x3", "fx"), torch.zeros(1, 3, 5, 5))
        >>> "FLOPs = 2×MACs" in render_table(rep)
        True
    """
    lines = [header(rep), "MACs: conv+linear multiply-accumulates for one forward on that input; FLOPs = 2×MACs", ""]
    rows = [("layer", "action", "params before→after", "MACs before→after", "MACs ×", "config / reason")]
    for r in rep.layers:
        detail = f"{config_text(r.config)}  ({r.reason})" if r.replaced else r.reason
        rows.append((r.name, "replace" if r.replaced else "skip",
                     f"{si(r.before.params)} → {si(r.after.params)}",
                     f"{si(r.before.macs)} → {si(r.after.macs)}",
                     factor(r.before.macs, r.after.macs), detail))
    o_b, o_a = rep.other_before, rep.other_after
    rows.append(("(everything else)", "", f"{si(o_b.params)} → {si(o_a.params)}",
                 f"{si(o_b.macs)} → {si(o_a.macs)}", factor(o_b.macs, o_a.macs), "outside the plan's layers"))
    if rep.layers:
        lines += [grid(rows), ""]
    rrows = [("region", "params before→after", "params Δ", "MACs before→after", "MACs Δ", "FLOPs after")]
    for g in [*rep.regions, RegionRow("total", rep.totals_before, rep.totals_after)]:
        rrows.append((g.name, f"{si(g.before.params)} → {si(g.after.params)}", pct(g.before.params, g.after.params),
                      f"{si(g.before.macs)} → {si(g.after.macs)}", pct(g.before.macs, g.after.macs),
                      si(g.after.flops)))
    lines += [grid(rrows), ""]
    tb, ta = rep.totals_before, rep.totals_after
    lines.append(f"total params: {tb.params:,} → {ta.params:,} ({_change(tb.params, ta.params, 'smaller', 'larger')}, "
                 f"{pct(tb.params, ta.params)})")
    lines.append(f"total MACs:   {tb.macs:,} → {ta.macs:,} ({_change(tb.macs, ta.macs, 'fewer', 'more')}, "
                 f"{pct(tb.macs, ta.macs)}); FLOPs (= 2×MACs) {tb.flops:,} → {ta.flops:,}")
    lines.append(NOT_COUNTED)
    lines += fidelity_lines(rep) + latency_lines(rep)
    if rep.calibration is not None and hasattr(rep.calibration, "table"):
        lines += ["", "calibration:", render_calibration(rep.calibration)]
    lines += [f"plan note: {n}" for n in rep.plan_notes]
    lines += [f"note: {n}" for n in rep.notes]
    lines += [f"warning: {w}" for w in rep.warnings]
    return "\n".join(lines)




def render_plan(plan: Any) -> str:
    """The plan's decision table: one line per candidate conv, replaced or skipped and why.

    Example:
        >>> from dsrewrite.plan_types import Plan, PlanEntry
        >>> print(render_plan(Plan((PlanEntry("head", "skip", "1×1: already pointwise"),), "all_3x3", "fx")))
        plan: recipe 'all_3x3', capture fx, 0 replaced, 1 skipped
        conv  action  config / reason
        ------------------------------------
        head  skip    1×1: already pointwise
    """
    return str(plan.table())


def render_calibration(calibration: Any) -> str:
    """The calibration table of a :class:`~dsrewrite.calibrate.CalibrationResult`: one line per refitted block."""
    return str(calibration.table())


def _change(before: int, after: int, down: str, up: str) -> str:
    """``'3.10× fewer'`` when it shrank, ``'1.08× more'`` when it grew (never "0.93× fewer").

    Example:
        >>> _change(100, 50, "fewer", "more"), _change(100, 108, "fewer", "more")
        ('2.00× fewer', '1.08× more')
    """
    if before and after > before:
        return f"{factor(after, before)} {up}"
    return f"{factor(before, after)} {down}"
