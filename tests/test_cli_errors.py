"""Tests of the CLI's one error style (``CliError``, a ``click.ClickException``) and its registry-fed choices.

Every failure is ``error: ...`` on one line (plus ``hint:`` for an unexpected exception),
exit 2 for bad usage or input, 1 for a failed rewrite; ``--debug`` adds the traceback.
These run no rewrite: they fail before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import dsrewrite.recipe
from dsrewrite.cli import CliError, main
from dsrewrite.errors import PlanError, RecipeError
from dsrewrite.report import register_renderer, unregister_renderer

from toy_renderer import CsvRenderer


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_cli_error_is_a_click_exception_carrying_the_exit_code() -> None:
    assert issubclass(CliError, click.ClickException)
    assert (CliError.of(RecipeError("r")).exit_code, CliError.of(PlanError("p")).exit_code,
            CliError.of(RuntimeError("b")).exit_code) == (2, 1, 1)


def test_usage_error_is_one_line_exit_2_and_debug_adds_the_traceback() -> None:
    r = invoke("recipes", "show", "decodr_only")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert len(lines(r.output)) == 1, r.output
    assert lines(r.output)[0].startswith("error: builtin:decodr_only: no built-in recipe 'decodr_only' "
                                         "(did you mean 'decoder_only'?)")
    r = invoke("--debug", "recipes", "show", "decodr_only")
    assert r.exit_code == 2 and "Traceback" in r.output and "error: builtin:decodr_only" in r.output


@pytest.mark.parametrize("exc, code, hint", [(PlanError("the plan is stale"), 1, False),
                                             (RuntimeError("boom"), 1, True)])
def test_failures_exit_1(monkeypatch: pytest.MonkeyPatch, exc: Exception, code: int, hint: bool) -> None:
    def fail(name: str) -> Path:
        raise exc

    monkeypatch.setattr(dsrewrite.recipe, "builtin_recipe_path", fail)
    r = invoke("recipes", "show", "decoder_only")
    want = ["error: the plan is stale"] if not hint else [
        "error: the rewrite failed: RuntimeError: boom", "hint: rerun with --debug for the traceback"]
    assert (r.exit_code, lines(r.output)) == (code, want)


def test_report_suffix_is_checked_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "m.ds.pt"
    r = invoke("apply", str(tmp_path / "missing.pt"), "--recipe", "decoder_only", "-o", str(out),
               "--report", str(tmp_path / "r.jsn"))
    assert r.exit_code == 2, r.output
    assert lines(r.output) == [f"error: report path {str(tmp_path / 'r.jsn')!r} has suffix '.jsn'; use one of "
                               ".json (JSON), .md (Markdown), .txt (plain-text table), .png (PNG plot) "
                               "(did you mean '.json'?)."]
    assert list(tmp_path.iterdir()) == []


def test_report_formats_come_from_the_registry(tmp_path: Path) -> None:
    register_renderer(CsvRenderer())
    try:  # accepted: the run gets as far as loading the (missing) model
        r = invoke("apply", str(tmp_path / "missing.pt"), "--recipe", "decoder_only", "--report",
                   str(tmp_path / "r.csv"))
        assert r.exit_code == 2 and "suffix" not in r.output and "missing.pt" in r.output, r.output
    finally:
        unregister_renderer(".csv")


def test_init_choices_come_from_the_recipe_choices() -> None:
    from dsrewrite.recipe.choices import INITS

    r = invoke("apply", "demo", "--recipe", "decoder_only", "--init", "svdd")
    assert r.exit_code == 2 and "'svdd' is not one of " + ", ".join(map(repr, INITS)) in r.output, r.output
