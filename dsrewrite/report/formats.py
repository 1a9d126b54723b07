# SPDX-License-Identifier: Apache-2.0
"""Report formats: one renderer per file suffix, in a registry that :func:`save_report` reads.

A renderer is any object with ``suffix`` (``".md"``, lower case, with the dot),
``description`` (one line: ``"Markdown"``) and ``render(report) -> str | bytes``
(text is written UTF-8). Registration is code, not user input: a malformed renderer
raises ``TypeError``, a taken or malformed suffix ``ValueError``. A suffix from the
user (a report path) is checked by :func:`check_report_path` before any work.

Example:
    >>> renderer_suffixes()
    ('.json', '.md', '.txt', '.png')
    >>> check_report_path("r.jsn")
    Traceback (most recent call last):
    ...
    dsrewrite.errors.OutputError: report path 'r.jsn' has suffix '.jsn'; use one of .json (JSON), .md (Markdown), .txt (plain-text table), .png (PNG plot) (did you mean '.json'?).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Protocol, Union, runtime_checkable

from ..errors import OutputError, did_you_mean
from ..runtime.registry import Registry
from .files import write_atomic
from .markdown import render_markdown
from .plot import render_png
from .records import Report
from .table import render_table

__all__ = ["ReportRenderer", "RENDERER_MEMBERS", "register_renderer", "unregister_renderer", "get_renderer",
           "renderer_suffixes", "renderers", "check_report_path", "save_report",
           "JsonRenderer", "MarkdownRenderer", "TableRenderer", "PngRenderer"]

#: The members a renderer must have.
RENDERER_MEMBERS: tuple[str, ...] = ("suffix", "description", "render")
_SUFFIX = re.compile(r"^\.[a-z0-9][a-z0-9_.-]*$")


@runtime_checkable
class ReportRenderer(Protocol):
    """One report format: the file ``suffix`` it owns, a ``description``, and ``render(report)``."""

    suffix: str
    description: str

    def render(self, report: Report) -> Union[str, bytes]: ...


_RENDERERS: Registry[ReportRenderer] = Registry("report renderer", key_word="for", unregister="unregister_renderer")


def register_renderer(renderer: ReportRenderer) -> ReportRenderer:
    """Add ``renderer`` for its suffix (returns it).

    Raises:
        TypeError: ``renderer`` lacks members (all missing ones are named).
        ValueError: the suffix is taken or is not a lower-case ``.name``.

    Example:
        >>> register_renderer(get_renderer(".md"))
        Traceback (most recent call last):
        ...
        ValueError: a report renderer for '.md' is already registered (MarkdownRenderer); unregister_renderer('.md') first, or pick another suffix.
    """
    missing = [m for m in RENDERER_MEMBERS if getattr(renderer, m, None) is None
               or (m == "render" and not callable(getattr(renderer, m)))]
    if missing:
        raise TypeError(f"{type(renderer).__name__} is not a report renderer: it lacks {', '.join(missing)} "
                        f"(a renderer needs: {', '.join(RENDERER_MEMBERS)}; see dsrewrite.report.ReportRenderer).")
    suffix = renderer.suffix
    if not isinstance(suffix, str) or not _SUFFIX.match(suffix):
        raise ValueError(f"{suffix!r} cannot be a report suffix: use a lower-case suffix with its dot, e.g. '.csv'.")
    return _RENDERERS.add(suffix, renderer)


def unregister_renderer(suffix: str) -> ReportRenderer:
    """Remove and return the renderer for ``suffix`` (``KeyError`` if there is none)."""
    return _RENDERERS.remove(suffix)


def get_renderer(suffix: str) -> ReportRenderer:
    """The renderer for ``suffix``; ``KeyError`` naming the registered suffixes otherwise."""
    return _RENDERERS.get(suffix)


def renderer_suffixes() -> tuple[str, ...]:
    """The registered suffixes, in registration order."""
    return _RENDERERS.keys()


def renderers() -> tuple[ReportRenderer, ...]:
    """The registered renderers, in registration order."""
    return _RENDERERS.values()


def check_report_path(path: Union[str, "os.PathLike[str]"]) -> ReportRenderer:
    """The renderer a report path asks for by its suffix (case-insensitive).

    Raises:
        OutputError: no renderer owns the suffix (the message lists them, with "did you mean").
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in _RENDERERS:
        raise OutputError(
            f"report path {str(p)!r} has suffix {suffix or '(none)'!r}; use one of "
            f"{', '.join(f'{s} ({r.description})' for s, r in _RENDERERS.items())}"
            f"{did_you_mean(suffix, list(_RENDERERS.keys()))}."
        )
    return _RENDERERS[suffix]


def save_report(rep: Report, path: Union[str, "os.PathLike[str]"]) -> Path:
    """Write the report in the format its suffix names: ``.json``, ``.md``, ``.txt`` (the table), ``.png``, or a registered one.

    Raises:
        OutputError: an unregistered suffix (the valid ones are listed), or the folder does not exist.
        PlotUnavailableError: ``.png`` without matplotlib.

    Example:
        >>> import torch, tempfile, json
        >>> from torch import nn
        >>> from dsrewrite.plan_types import Plan
        >>> from dsrewrite.report import build_plan_report
        >>> rep = build_plan_report(nn.Conv2d(3, 4, 3), Plan((), "all_3x3", "fx"), torch.zeros(1, 3, 5, 5))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     json.loads(save_report(rep, f"{d}/r.json").read_text())["schema_version"]
        2
    """
    p = Path(path)
    renderer = check_report_path(p)
    write_atomic(p, renderer.render(rep))
    return p


class JsonRenderer:
    """``.json``: :meth:`Report.to_dict` (the stable schema of docs/report.md), indented, UTF-8."""

    suffix, description = ".json", "JSON"

    def render(self, report: Report) -> str:
        return json.dumps(report.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


class MarkdownRenderer:
    """``.md``: :func:`~dsrewrite.report.render_markdown`."""

    suffix, description = ".md", "Markdown"

    def render(self, report: Report) -> str:
        return render_markdown(report)


class TableRenderer:
    """``.txt``: the terminal table (:func:`~dsrewrite.report.render_table`)."""

    suffix, description = ".txt", "plain-text table"

    def render(self, report: Report) -> str:
        return render_table(report) + "\n"


class PngRenderer:
    """``.png``: the per-layer MACs bar chart (:func:`~dsrewrite.report.render_png`, matplotlib)."""

    suffix, description = ".png", "PNG plot"

    def render(self, report: Report) -> bytes:
        return render_png(report)


for _renderer in (JsonRenderer(), MarkdownRenderer(), TableRenderer(), PngRenderer()):
    register_renderer(_renderer)
del _renderer


