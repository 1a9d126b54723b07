# SPDX-License-Identifier: Apache-2.0
"""The PNG plot of a report (the ``.png`` format): per-layer MACs before and after, drawn by matplotlib.

matplotlib is optional (``pip install 'dsrewrite[plot]'``); without it the plot raises
:class:`PlotUnavailableError` and writes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from ..errors import OutputError, UsageError
from .files import write_atomic
from .records import Report

__all__ = ["PlotUnavailableError", "render_png", "save_plot"]


class PlotUnavailableError(UsageError):
    """``save_plot`` needs matplotlib, which is not installed."""


def save_plot(rep: Report, path: Union[str, os.PathLike], *, max_layers: int = 60) -> Path:
    """Write a PNG bar chart of per-layer MACs before and after (matplotlib, Agg canvas, no pyplot).

    At most ``max_layers`` layers are drawn (those with the most MACs before).

    Raises:
        PlotUnavailableError: matplotlib is not installed.
        OutputError: the suffix is not ``.png`` or the folder does not exist.

    Example:
        >>> import torch, tempfile
        >>> from torch import nn
        >>> from dsrewrite.plan_types import Plan, PlanEntry
        >>> from dsrewrite.report import build_plan_report
        >>> p = Plan((PlanEntry("", "skip", "demo"),), "all_3x3", "fx")
        >>> rep = build_plan_report(nn.Conv2d(3, 4, 3), p, torch.zeros(1, 3, 5, 5))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_plot(rep, f"{d}/macs.png").read_bytes()[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise OutputError(f"plot path {str(p)!r} must end in .png (got {p.suffix or 'no suffix'!r}).")
    write_atomic(p, render_png(rep, max_layers=max_layers))
    return p


def render_png(rep: Report, *, max_layers: int = 60) -> bytes:
    """The PNG bar chart of per-layer MACs before and after, as bytes (see :func:`save_plot`).

    Raises:
        PlotUnavailableError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError as exc:
        raise PlotUnavailableError(
            f"save_plot needs matplotlib, which cannot be imported ({exc}). "
            "Hint: pip install 'dsrewrite[plot]' (or pip install matplotlib)."
        ) from exc
    import io

    layers = list(rep.layers)
    title = f"{rep.model}: MACs per plan layer (recipe {rep.recipe!r}; FLOPs = 2×MACs)"
    if len(layers) > max_layers:
        keep = set(sorted(range(len(layers)), key=lambda i: -layers[i].before.macs)[:max_layers])
        layers = [r for i, r in enumerate(layers) if i in keep]
        title += f"\n{max_layers} of {len(rep.layers)} layers shown (largest before)"
    n = max(1, len(layers))
    fig = Figure(figsize=(10, 1.6 + 0.28 * n))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = list(range(len(layers)))
    ax.barh([y - 0.2 for y in ys], [r.before.macs for r in layers], height=0.4, label="before", color="#8c8c8c")
    ax.barh([y + 0.2 for y in ys], [r.after.macs for r in layers], height=0.4, label="after", color="#1f77b4")
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r.name} ({'replace' if r.replaced else 'skip'})" for r in layers], fontsize=7)
    ax.invert_yaxis()
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel("MACs (conv+linear multiply-accumulates, one forward)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    if not layers:
        ax.text(0.5, 0.5, "no layers in the plan", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
