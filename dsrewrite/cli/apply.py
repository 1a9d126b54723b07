# SPDX-License-Identifier: Apache-2.0
"""``dsrewrite apply``: rewrite, optionally calibrate, report, save."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click

from ..runtime.input_files import path_exists
from .common import (check_report_path, handle_errors, example_inputs_of, load_model_arg, make_plan, model_options, progress, recipe_options, RegistryChoice, presets, save_formats)
from .export import export_entry, export_formats, run_export
from ..errors import UsageError
from .budget import budget_of, budget_options


@click.command()
@model_options
@recipe_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Output file (default: MODEL.ds.pt beside the input). A .plan.json is written beside it.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, callback=check_report_path,
              help="Write the report; its suffix picks the format: .json, .md (Markdown), .txt (the table), "
                   ".png (plot), or one registered with dsrewrite.report.register_renderer.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG bar chart of per-layer MACs before/after.")
@click.option("--calib", type=click.Path(), default=None,
              help="Calibration data: a folder of images/.npy arrays (recursive; png jpg jpeg bmp tif tiff webp) "
                   "or a tensor file (.pt, .npy, .npz). See docs/data.md.")
@click.option("--calib-size", default=None, help="Resize calibration images to H,W (default: the input shape's).")
@click.option("--calib-preset", type=RegistryChoice(presets), default=None,
              help="Normalisation of calibration images (default: imagenet for 3 channels, none otherwise; "
                   "overridden by --calib-mean/--calib-std).")
@click.option("--calib-mean", default=None, help="Per-channel mean (1 or C values), e.g. 0.485,0.456,0.406.")
@click.option("--calib-std", default=None, help="Per-channel std (1 or C values), e.g. 0.229,0.224,0.225.")
@click.option("--calib-limit", type=click.IntRange(min=1, max=1_000_000), default=64, show_default=True,
              help="Use at most this many calibration samples (only these are decoded).")
@click.option("--calib-activation", type=click.Choice(["auto", "none"]), default="auto", show_default=True,
              help="auto: fit blocks whose conv feeds a (BatchNorm +) ReLU through that ReLU; none: linear fit only.")
@click.option("--benchmark", is_flag=True, help="Measure latency before/after (interleaved, medians).")
@click.option("--dry-run", is_flag=True, help="Plan and report, write nothing.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--save-format", type=RegistryChoice(save_formats), default=None,
              help="torch: the full module (default); safetensors: the weights only, reloaded with --arch and "
                   "the plan sidecar. Default: from -o's suffix.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--export", "export_path", type=click.Path(dir_okay=False), default=None,
              help="Also export the rewrite's deployment form to this file (.onnx or .pte), checked in its runtime "
                   "as `dsrewrite export` does; written before the model (not with --dry-run).")
@click.option("--export-format", type=RegistryChoice(export_formats), default=None,
              help="Format of --export (default: from its suffix).")
@click.option("--export-static", is_flag=True, help="Fix --export's input shape to the example's.")
@budget_options
@handle_errors
def apply(model: str, input_shape: Optional[tuple[int, ...]], example_inputs: Optional[str], arch: Optional[str],
          arch_args: tuple[str, ...], trust_pickle: bool, recipe: str,
          depth_multiplier: Optional[int], order: Optional[str], init: Optional[str], output: Optional[str],
          report_path: Optional[str], plot_path: Optional[str], calib: Optional[str], calib_size: Optional[str],
          calib_preset: Optional[str], calib_mean: Optional[str], calib_std: Optional[str], calib_limit: int,
          calib_activation: str, benchmark: bool, dry_run: bool, force: bool, as_json: bool,
          save_format: Optional[str], export_path: Optional[str], export_format: Optional[str],
          export_static: bool, target_macs: Optional[float] = None, target_params: Optional[float] = None,
          target_latency: Optional[float] = None, max_error: Optional[float] = None, **load_options: Any) -> None:
    """Rewrite MODEL with a recipe, save it, and print what changed and what it bought."""
    from ..io import check_outputs, default_output_path, plan_path_for, save_rewrite
    from ..report import render_table, save_plot, save_report

    if save_format is None:
        save_format = "safetensors" if output and Path(output).suffix == ".safetensors" else "torch"
    out_path = Path(output) if output else default_output_path(model)
    if not output and save_format == "safetensors":
        out_path = out_path.with_suffix(".safetensors")
    if save_format == "safetensors" and out_path.suffix != ".safetensors":
        raise UsageError(f"-o {out_path}: --save-format safetensors needs a .safetensors output name.")
    input_path = Path(model) if path_exists(model) else None
    check_outputs({"-o": None if dry_run else out_path, "the plan sidecar": None if dry_run else plan_path_for(out_path),
                   "--report": report_path, "--plot": plot_path, "--export": export_path},
                  inputs={"MODEL": input_path, "--recipe": recipe if path_exists(recipe) else None,
                          "--calib": calib, "--example-inputs": example_inputs},
                  force=force, replaceable=("--report", "--plot"))  # all together, before any work
    exporting = export_entry(export_path, export_format) if export_path else None  # its path: checked above
    loaded = load_model_arg(model, arch, arch_args, trust_pickle, **load_options)
    x, shape = example_inputs_of(loaded, input_shape, example_inputs)
    calib_data = None
    if calib:
        from ..calib_data import open_calibration

        calib_data = open_calibration(calib, input_shape=shape, size=calib_size, preset=calib_preset,
                                      mean=calib_mean, std=calib_std, limit=calib_limit)
    budget = budget_of(target_macs, target_params, target_latency, max_error)
    p = make_plan(loaded, recipe, x, shape, depth_multiplier=depth_multiplier, order=order, init=init,
                  budget=budget, calibration=calib_data.loader if calib_data else None)
    if not dry_run:  # before the work: a parametrized module the plan keeps cannot be saved as a full module
        from ..io.saveable import check_saveable
        from ..runtime.preflight import unwrap_parallel

        check_saveable(unwrap_parallel(loaded.model)[0], save_format, replaced={e.name for e in p.replaced})
    from ..api import rewrite_with_plan

    progress(f"rewriting {len(p.replaced)} convs" + (" and calibrating ..." if calib_data else " ..."))
    result = rewrite_with_plan(loaded.model, p, x, calibration=calib_data.loader if calib_data else None,
                               calibration_options={"activation": calib_activation}, benchmark=benchmark,
                               task_metric=loaded.task_metric,
                               share_weights=True)  # the loaded model is ours: no second copy (memory)
    rep = result.report
    if calib_data is not None:
        click.echo(f"calibration data: {calib_data.describe()}", err=True)
    for note in p.notes:  # a budgeted plan: its target and prediction, then what calibration measured
        if note.startswith("budget ("):
            cal = result.calibration
            measured = "" if cal is None else (f"; measured after calibration on the calibration inputs "
                                               f"{cal.output_rel_error_after:.4g}")
            click.echo(f"{note}{measured}", err=True)
    from ..budget.latency_costs import latency_check_for_plan  # a latency budget: the result timed against the dense

    lat_check = latency_check_for_plan(p, loaded.model, result.model, x)
    if lat_check is not None:
        click.echo(lat_check, err=True)
    exported = None
    if exporting is not None and not dry_run:
        exported = run_export(result.model, x, str(export_path), exporting.name, static=export_static, opset=None)
    if as_json:
        click.echo(json.dumps({**rep.to_dict(), **({"export": exported.to_dict()} if exported else {})}, indent=2))
    else:
        click.echo(render_table(rep))
        if exported is not None:
            click.echo(str(exported))
    # The model and its plan first (both or neither): a failed write leaves no output at all.
    if not dry_run:
        weights, plan_file = save_rewrite(result.model, p, out_path, force=force, input_path=input_path,
                                          save_format=save_format, arch=loaded.arch)
        click.echo(f"wrote {weights} and {plan_file}", err=True)
    if report_path:
        save_report(rep, report_path)
    if plot_path:
        save_plot(rep, plot_path)
    if dry_run:
        click.echo("dry run: model not written", err=True)
