# SPDX-License-Identifier: Apache-2.0
"""The report of a rewrite: what was replaced, what it cost before and after, how close the outputs stay.

One idea per module: the records and their stable JSON form (:mod:`.records`,
``schema_version`` :data:`REPORT_SCHEMA_VERSION`, described in ``docs/report.md``),
building them (:mod:`.build`), the ``inspect`` inventory (:mod:`.inventory`), and one
renderer per format: the terminal table and the plan/calibration tables (:mod:`.table`),
Markdown (:mod:`.markdown`), the PNG plot (:mod:`.plot`). The formats a report file can
take are a registry keyed by suffix (:mod:`.formats`): :func:`save_report` picks the
renderer by the path's suffix (``.json``, ``.md``, ``.txt``, ``.png``, or one registered
with :func:`register_renderer`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dsrewrite.plan_types import Plan
    >>> rep = build_plan_report(nn.Conv2d(3, 4, 3), Plan((), "all_3x3", "fx"), torch.zeros(1, 3, 5, 5))
    >>> rep.kind, renderer_suffixes()
    ('model', ('.json', '.md', '.txt', '.png'))
"""

from .build import build_plan_report, build_report
from .files import write_atomic
from .formats import (
    ReportRenderer,
    check_report_path,
    get_renderer,
    register_renderer,
    renderer_suffixes,
    renderers,
    save_report,
    unregister_renderer,
)
from .inventory import build_inventory, render_inventory
from .markdown import render_markdown
from .plot import PlotUnavailableError, render_png, save_plot
from .records import REPORT_SCHEMA_VERSION, UNITS, Cost, LayerRow, RegionRow, Report, reduction
from .table import render_calibration, render_plan, render_table
from .text import LARGE_CHANGE

__all__ = [
    "REPORT_SCHEMA_VERSION",
    "UNITS",
    "LARGE_CHANGE",
    "Cost",
    "LayerRow",
    "RegionRow",
    "Report",
    "PlotUnavailableError",
    "build_report",
    "build_plan_report",
    "build_inventory",
    "render_inventory",
    "render_table",
    "render_markdown",
    "render_plan",
    "render_calibration",
    "render_png",
    "save_report",
    "save_plot",
    "reduction",
    "write_atomic",
    "ReportRenderer",
    "register_renderer",
    "unregister_renderer",
    "get_renderer",
    "renderer_suffixes",
    "renderers",
    "check_report_path",
]
