"""Tests of the report-format registry: a toy ``.csv`` renderer from a test-local file writes a report.

``tests/toy_renderer.py`` registers ``.csv``; ``save_report`` then picks it by suffix,
the suffix error lists it, and it is gone when unregistered. Built-in formats are
picked by suffix too (``.md`` is Markdown, ``.png`` the plot).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

from dsrewrite.errors import OutputError, UsageError
from dsrewrite.layers import DepthwiseSeparableConv2d
from dsrewrite.plan_types import LayerConfig, Plan, PlanEntry
from dsrewrite.report import (
    Report,
    build_report,
    get_renderer,
    register_renderer,
    render_markdown,
    renderer_suffixes,
    save_report,
    unregister_renderer,
)

from toy_renderer import COLUMNS, CsvRenderer

BUILTIN = (".json", ".md", ".txt", ".png")


@pytest.fixture(scope="module")
def rep() -> Report:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(16, 4, 1))
    rewritten = nn.Sequential(DepthwiseSeparableConv2d.from_conv(model[0]), nn.ReLU(), model[2])
    plan = Plan((PlanEntry("0", "replace", "3×3", LayerConfig()), PlanEntry("2", "skip", "1×1: already pointwise")),
                recipe="all_3x3", capture="fx")
    return build_report(model, rewritten, plan, torch.randn(1, 8, 12, 12))


@pytest.fixture
def toy() -> Iterator[CsvRenderer]:
    renderer = register_renderer(CsvRenderer())
    try:
        yield renderer
    finally:
        unregister_renderer(".csv")


def test_toy_csv_renderer_writes_a_report(rep: Report, toy: CsvRenderer, tmp_path: Path) -> None:
    assert renderer_suffixes() == (*BUILTIN, ".csv") and get_renderer(".csv") is toy
    path = save_report(rep, tmp_path / "r.CSV")  # the suffix is matched case-insensitively
    rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    assert tuple(rows[0]) == COLUMNS
    assert [r[:2] for r in rows[1:]] == [["0", "replace"], ["2", "skip"]]
    by = {r.name: r for r in rep.layers}
    assert [int(v) for v in rows[1][2:]] == [by["0"].before.params, by["0"].after.params,
                                            by["0"].before.macs, by["0"].after.macs]
    assert int(rows[1][4]) > int(rows[1][5]) > 0  # fewer MACs after the replacement
    with pytest.raises(OutputError, match=r"\.csv \(CSV, one row per plan layer\) \(did you mean '\.csv'\?\)"):
        save_report(rep, tmp_path / "r.cvs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.CSV"]  # nothing else left behind


def test_unregistered_format_is_refused(rep: Report, tmp_path: Path) -> None:
    register_renderer(CsvRenderer())
    assert isinstance(unregister_renderer(".csv"), CsvRenderer)
    with pytest.raises(UsageError, match=r"suffix '\.csv'; use one of \.json \(JSON\), \.md \(Markdown\), "
                                         r"\.txt \(plain-text table\), \.png \(PNG plot\)\.$"):
        save_report(rep, tmp_path / "r.csv")
    assert not (tmp_path / "r.csv").exists()
    with pytest.raises(KeyError, match=r"no report renderer for '\.csv'"):
        unregister_renderer(".csv")


def test_builtin_formats_by_suffix(rep: Report, tmp_path: Path) -> None:
    assert save_report(rep, tmp_path / "r.md").read_text(encoding="utf-8") == render_markdown(rep)
    assert json.loads(save_report(rep, tmp_path / "r.json").read_text(encoding="utf-8")) == json.loads(
        json.dumps(rep.to_dict()))
    pytest.importorskip("matplotlib", reason="the .png format needs matplotlib")
    assert save_report(rep, tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_duplicate_and_malformed_renderers_are_refused(toy: CsvRenderer) -> None:
    with pytest.raises(ValueError, match=r"'\.csv' is already registered \(CsvRenderer\)"):
        register_renderer(CsvRenderer())

    class NoRender:
        suffix, description = ".xyz", "nothing"

    with pytest.raises(TypeError, match="NoRender is not a report renderer: it lacks render"):
        register_renderer(NoRender())  # type: ignore[arg-type]
    for bad in ("csv", ".CSV", "", ".a b"):
        r = CsvRenderer()
        r.suffix = bad  # type: ignore[misc]
        with pytest.raises(ValueError, match="cannot be a report suffix"):
            register_renderer(r)
    assert renderer_suffixes() == (*BUILTIN, ".csv")
