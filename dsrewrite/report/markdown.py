# SPDX-License-Identifier: Apache-2.0
"""The report as Markdown (the ``.md`` format): per-layer, per-region and total tables with exact counts."""

from __future__ import annotations

from typing import Any, Iterable

from ..macs import NOT_COUNTED
from .records import RegionRow, Report
from .table import render_calibration
from .text import config_text, factor, fidelity_lines, header, latency_lines, pct

__all__ = ["render_markdown"]


def _md_row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _md_table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return [_md_row(head), _md_row("---" for _ in head), *(_md_row(r) for r in rows)]


def render_markdown(rep: Report) -> str:
    """The report as Markdown: per-layer, per-region and total tables with exact counts.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dsrewrite.plan_types import Plan
        >>> from dsrewrite.report import build_plan_report
        >>> rep = build_plan_report(nn.Conv2d(3, 4, 3), Plan((), "all_3x3", "fx"), torch.zeros(1, 3, 5, 5))
        >>> "| **total** | 112 | 112 |" in render_markdown(rep)
        True
    """
    out = [f"# {header(rep)}", "",
           "MACs: multiply-accumulates of conv and linear layers (bias excluded) for one forward on the example "
           "input. **FLOPs = 2×MACs.** Params: parameter count (bias included).", "",
           f"_{NOT_COUNTED}._", ""]
    if rep.layers:
        out += ["## Layers of the plan", ""]
        rows = []
        for r in rep.layers:
            shapes = f"{r.input_shape or '?'} → {r.output_shape or '?'}"
            rows.append([f"`{r.name}`", r.region, shapes, "replace" if r.replaced else "skip",
                         f"{r.before.params:,}", f"{r.after.params:,}", f"{r.before.macs:,}", f"{r.after.macs:,}",
                         f"{r.after.flops:,}", factor(r.before.macs, r.after.macs),
                         config_text(r.config), r.reason])
        rows.append(["(everything else)", "", "", "", f"{rep.other_before.params:,}", f"{rep.other_after.params:,}",
                     f"{rep.other_before.macs:,}", f"{rep.other_after.macs:,}", f"{rep.other_after.flops:,}",
                     factor(rep.other_before.macs, rep.other_after.macs), "", "outside the plan's layers"])
        out += _md_table(["layer", "region", "input → output", "action", "params before", "params after",
                          "MACs before", "MACs after", "FLOPs after (2×MACs)", "MACs ×", "config", "reason"], rows)
        out.append("")
    out += ["## Regions and total", ""]
    rows = []
    for g in [*rep.regions, RegionRow("total", rep.totals_before, rep.totals_after)]:
        total = g.before is rep.totals_before and g.after is rep.totals_after and g.name == "total"
        rows.append(["**total**" if total else g.name, f"{g.before.params:,}", f"{g.after.params:,}",
                     pct(g.before.params, g.after.params), f"{g.before.macs:,}", f"{g.after.macs:,}",
                     pct(g.before.macs, g.after.macs), factor(g.before.macs, g.after.macs),
                     f"{g.before.flops:,}", f"{g.after.flops:,}"])
    out += _md_table(["region", "params before", "params after", "params Δ", "MACs before", "MACs after",
                      "MACs Δ", "MACs ×", "FLOPs before (2×MACs)", "FLOPs after (2×MACs)"], rows)
    extra = fidelity_lines(rep) + latency_lines(rep)
    if extra:
        out += ["", "## Fidelity and latency", "", *(f"- {x}" for x in extra)]
    if rep.calibration is not None and hasattr(rep.calibration, "table"):
        out += ["", "## Calibration", "", "```", render_calibration(rep.calibration), "```"]
    tail = ([f"- plan note: {n}" for n in rep.plan_notes] + [f"- note: {n}" for n in rep.notes]
            + [f"- **warning:** {w}" for w in rep.warnings])
    if tail:
        out += ["", "## Notes", "", *tail]
    return "\n".join(out) + "\n"
