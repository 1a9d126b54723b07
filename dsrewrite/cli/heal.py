"""``dsrewrite heal``: distil the original into the rewritten model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import click

from ..runtime.input_files import path_exists
from .common import (positive_float, handle_errors, example_inputs_of, load_model_arg, model_options, RegistryChoice, presets, trust_warnings)


@click.command()
@model_options
@click.option("--rewritten", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The rewritten model written by `dsrewrite apply`.")
@click.option("--data", required=True, type=click.Path(),
              help="Unlabeled data, all of it used and streamed: a folder of images/.npy arrays (recursive), a "
                   "tensor file (.pt, .npy, .npz), or 'demo' (the demo's generated images). See docs/data.md.")
@click.option("--calib-size", default=None, help="Resize images to H,W (default: the input shape's).")
@click.option("--calib-preset", type=RegistryChoice(presets), default=None,
              help="Normalisation of images (default: imagenet for 3 channels, none otherwise).")
@click.option("--calib-mean", default=None, help="Per-channel mean (1 or C values).")
@click.option("--calib-std", default=None, help="Per-channel std (1 or C values).")
@click.option("--steps", type=click.IntRange(min=1, max=1_000_000), default=200, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True, callback=positive_float)
@click.option("--batch-size", type=click.IntRange(min=1, max=65_536), default=8, show_default=True)
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint file (written at the end; with --resume, continued from).")
@click.option("--resume", is_flag=True, help="Continue from --checkpoint.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Where to write the healed model.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@handle_errors
def heal(model: str, input_shape: Optional[tuple[int, ...]], example_inputs: Optional[str], arch: Optional[str],
         arch_args: tuple[str, ...], trust_pickle: bool, rewritten: str, data: str, calib_size: Optional[str], calib_preset: Optional[str],
         calib_mean: Optional[str], calib_std: Optional[str], steps: int, lr: float, batch_size: int,
         checkpoint: Optional[str], resume: bool, output: str, force: bool, **load_options: Any) -> None:
    """Distil the original MODEL into the rewritten model for a few steps (no labels)."""
    from ..calib_data import open_calibration
    from ..heal import heal as heal_fn
    from ..io import atomic_save, check_outputs, load_model

    check_outputs({"-o": output, "--checkpoint": checkpoint},  # all together, before any work
                  inputs={"MODEL": model if path_exists(model) else None, "--rewritten": rewritten, "--data": data if path_exists(data) else None},
                  force=force, replaceable=("--checkpoint",) if resume else ())  # --resume continues it
    loaded = load_model_arg(model, arch, arch_args, trust_pickle, **load_options)
    x, shape = example_inputs_of(loaded, input_shape, example_inputs)
    with trust_warnings():
        student = load_model(rewritten, trust_pickle=trust_pickle, allow_modules=load_options["allow_modules"],
                             allow_globals=load_options["allow_globals"]).model
    source = open_calibration(data, input_shape=shape, size=calib_size, preset=calib_preset, mean=calib_mean,
                              std=calib_std, batch_size=batch_size)
    metric = loaded.task_metric  # the demo's held-out mIoU; None for a user's model
    before = metric(student) if metric is not None else None
    result = heal_fn(student, loaded.model, source.loader, steps=steps, lr=lr, checkpoint=checkpoint,
                     resume=resume, progress=sys.stderr.isatty(), example_inputs=x)
    atomic_save(student, Path(output), overwrite=force)
    hist = getattr(result, "losses", None) or []
    if hist:
        click.echo(f"distillation loss {hist[0]:.4g} -> {hist[-1]:.4g} over {len(hist)} steps "
                   f"({result.images} samples drawn from the {source.count} in {data})")
    if metric is not None:
        click.echo(f"task metric {metric.name}: original {metric(loaded.model):.2f}; rewritten {before:.2f} → "
                   f"healed {metric(student):.2f}")
    click.echo(f"wrote {output}", err=True)
