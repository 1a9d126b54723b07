# SPDX-License-Identifier: Apache-2.0
"""``dsrewrite plan``, ``inspect`` and ``recipes``: read a model and explain, write nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click

from ..runtime.input_files import path_exists
from .common import handle_errors, example_inputs_of, load_model_arg, make_plan, model_options, progress, recipe_options


@click.command("plan")
@model_options
@recipe_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan report as JSON on stdout.")
@handle_errors
def plan_cmd(model: str, input_shape: Optional[tuple[int, ...]], example_inputs: Optional[str], arch: Optional[str],
             arch_args: tuple[str, ...], trust_pickle: bool, recipe: str, depth_multiplier: Optional[int], order: Optional[str],
             init: Optional[str], as_json: bool, **load_options: Any) -> None:
    """Dry run: explain, for every candidate conv, whether it would be replaced and why."""
    from ..report import build_plan_report, render_plan, render_table

    loaded = load_model_arg(model, arch, arch_args, trust_pickle, **load_options)
    x, shape = example_inputs_of(loaded, input_shape, example_inputs)
    p = make_plan(loaded, recipe, x, shape, must_replace=False, depth_multiplier=depth_multiplier, order=order,
                   init=init)
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
