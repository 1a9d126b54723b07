# SPDX-License-Identifier: Apache-2.0
"""``dsrewrite plan``, ``inspect`` and ``recipes``: read a model and explain, write nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click

from ..runtime.input_files import path_exists
from .budget import budget_of, budget_options
from .common import handle_errors, example_inputs_of, load_model_arg, make_plan, model_options, progress, recipe_options


@click.command("plan")
@model_options
@recipe_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan report as JSON on stdout.")
@budget_options
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration data for a budget's sensitivity (as for apply; without it: a weight-space proxy).")
@click.option("--calib-limit", type=click.IntRange(min=1), default=64, show_default=True,
              help="Use at most this many calibration samples.")
@click.option("--budget-sweep", "budget_sweep", default=None, metavar="F1,F2,...",
              help="Print the Pareto curve: plan for each MAC fraction, calibrate and measure each (needs --calib), "
                   "with uniform m=1/m=2 and the built-in recipes for comparison.")
@click.option("--sweep-plot", type=click.Path(dir_okay=False), default=None, help="Write the sweep as a PNG.")
@click.option("--sweep-latency", type=click.IntRange(min=0, max=1000), default=0, show_default=True, metavar="ROUNDS",
              help="Also time every measured sweep point against the dense model on this machine (ROUNDS interleaved "
                   "rounds, median of per-round ratios); 0: no timing.")
@handle_errors
def plan_cmd(model: str, input_shape: Optional[tuple[int, ...]], example_inputs: Optional[str], arch: Optional[str],
             arch_args: tuple[str, ...], trust_pickle: bool, recipe: str, depth_multiplier: Optional[int], order: Optional[str],
             init: Optional[str], as_json: bool, target_macs: Optional[float] = None,
             target_params: Optional[float] = None, target_latency: Optional[float] = None,
             max_error: Optional[float] = None, calib: Optional[str] = None, calib_limit: int = 64,
             budget_sweep: Optional[str] = None, sweep_plot: Optional[str] = None, sweep_latency: int = 0,
             **load_options: Any) -> None:
    """Dry run: explain, for every candidate conv, whether it would be replaced and why."""
    from ..report import build_plan_report, render_plan, render_table

    budget = budget_of(target_macs, target_params, target_latency, max_error)
    fractions = _fractions(budget_sweep) if budget_sweep else None
    if sweep_plot:  # before any work, never one of the inputs (replaced if it exists, as apply's --plot)
        from ..io import check_outputs

        check_outputs({"--sweep-plot": sweep_plot}, inputs={"MODEL": model if path_exists(model) else None,
                      "--recipe": recipe if path_exists(recipe) else None, "--calib": calib,
                      "--example-inputs": example_inputs}, replaceable=("--sweep-plot",))
    loaded = load_model_arg(model, arch, arch_args, trust_pickle, **load_options)
    x, shape = example_inputs_of(loaded, input_shape, example_inputs)
    calib_data = None
    if calib:
        from ..calib_data import open_calibration

        calib_data = open_calibration(calib, input_shape=shape, limit=calib_limit)
    if fractions is not None:
        _sweep(loaded, recipe, x, calib_data, fractions, order, sweep_plot, sweep_latency)
        return
    p = make_plan(loaded, recipe, x, shape, must_replace=False, depth_multiplier=depth_multiplier, order=order,
                   init=init, budget=budget, calibration=calib_data.loader if calib_data else None)
    rep = build_plan_report(loaded.model, p, x)
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2))
    else:
        click.echo(render_plan(p))
        click.echo()
        click.echo(render_table(rep))
    if not p.replaced:
        click.echo(f"note: recipe {recipe!r} selects no conv ({len(p.entries)} candidates); each one's reason is "
                   "in the table above.", err=True)


@click.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the inventory as JSON on stdout.")
@handle_errors
def inspect(model: str, input_shape: Optional[tuple[int, ...]], example_inputs: Optional[str], arch: Optional[str],
            arch_args: tuple[str, ...], trust_pickle: bool, as_json: bool, **load_options: Any) -> None:
    """List every conv with its graph facts: the names and facts to write a recipe with."""
    from ..capture import capture
    from ..report import build_inventory, render_inventory

    loaded = load_model_arg(model, arch, arch_args, trust_pickle, **load_options)
    x, _ = example_inputs_of(loaded, input_shape, example_inputs)
    progress("capturing the graph ...")
    cap = capture(loaded.model, x)
    inv = build_inventory(loaded.model, cap, x)
    if as_json:
        click.echo(json.dumps(inv, indent=2))
    else:
        click.echo(render_inventory(inv))


@click.group(invoke_without_command=True)
@click.pass_context
def recipes(ctx: click.Context) -> None:
    """List the built-in recipes (``recipes show NAME`` prints one)."""
    if ctx.invoked_subcommand is None:
        from ..recipe import builtin_recipes

        items = builtin_recipes()
        width = max(len(n) for n in items)
        for name, desc in items.items():
            click.echo(f"{name:<{width}}  {desc}")


@recipes.command("show")
@click.argument("name")
@handle_errors
def recipes_show(name: str) -> None:
    """Print a built-in recipe (or a recipe file) as YAML."""
    from ..recipe import builtin_recipe_path, load_recipe

    path = Path(name) if path_exists(name) else builtin_recipe_path(name)
    load_recipe(str(path))  # validate
    click.echo(path.read_text(encoding="utf-8"), nl=False)


def _fractions(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of MAC fractions, e.g. 0.3,0.5,0.7",
                                 param_hint="--budget-sweep")
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise click.BadParameter(f"{text!r}: each fraction must be in (0, 1]", param_hint="--budget-sweep")
    return vals


def _sweep(loaded: Any, recipe: str, x: Any, calib_data: Any, fractions: list[float], order: Optional[str],
           plot: Optional[str], latency_rounds: int = 0) -> None:
    from ..budget.run import budget_inputs
    from ..budget.sweep import budget_sweep, save_sweep_plot, sweep_table
    from ..measure.macs import count_costs

    inputs = budget_inputs(loaded.model, x, calib_data.loader if calib_data else None, {})
    progress("sweeping budgets (one calibration per point) ...")
    points = budget_sweep(loaded.model, recipe, x, inputs, fractions=fractions, order=order or "auto",
                          latency_rounds=latency_rounds)
    click.echo(sweep_table(points, count_costs(loaded.model, x).total_macs))
    if inputs is None:
        click.echo("note: no --calib: errors are the weight-space proxy's predictions, nothing was measured.", err=True)
    if plot:
        save_sweep_plot(points, plot, title=f"{loaded.source}, recipe {recipe}")
        click.echo(f"wrote {plot}", err=True)
