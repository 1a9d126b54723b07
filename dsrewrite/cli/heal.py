# SPDX-License-Identifier: Apache-2.0
"""``dsrewrite heal``: distil the original into the rewritten model."""

from __future__ import annotations

from typing import Any, Optional

import click

from ..errors import UsageError
from ..runtime.input_files import path_exists
from .common import (positive_float, handle_errors, example_inputs_of, load_model_arg, model_options, RegistryChoice, presets, trust_warnings)


def _choices(name: str) -> RegistryChoice:
    def read() -> tuple[str, ...]:
        from ..refit import choices  # torch-free

        return tuple(getattr(choices, name))

    return RegistryChoice(read)


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
@click.option("--steps", type=click.IntRange(min=1, max=1_000_000), default=200, show_default=True,
              help="Optimizer steps in total (a resumed run counts the checkpoint's).")
@click.option("--lr", type=float, default=1e-4, show_default=True, callback=positive_float,
              help="Adam learning rate (the schedule's peak).")
@click.option("--schedule", type=_choices("SCHEDULES"), default="constant", show_default=True,
              help="Learning-rate schedule: decay to 0 at the last step (cosine, linear) or none.")
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True,
              help="Steps of linear warm-up from 0 to --lr.")
@click.option("--layer-weight", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Weight of the per-layer terms (each replaced block against its conv); 0: output only.")
@click.option("--output-loss", type=_choices("OUTPUT_LOSSES"), default="mse", show_default=True,
              help="Output term: mse, or kl (softmax over dim 1, for logits).")
@click.option("--trainable", type=_choices("TRAINABLE"), default="all", show_default=True,
              help="Train every parameter, or only the replaced blocks.")
@click.option("--train-mode", is_flag=True, help="Run the rewritten model in train mode (BatchNorm statistics update).")
@click.option("--batch-size", type=click.IntRange(min=1, max=65_536), default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the data order (shuffled per epoch).")
@click.option("--shuffle/--no-shuffle", default=True, show_default=True, help="Shuffle the data each epoch.")
@click.option("--device", default="auto", show_default=True,
              help="Where to train: auto (CUDA when available), cpu, cuda, cuda:N. Under torchrun: cuda:LOCAL_RANK.")
@click.option("--fidelity-batches", type=click.IntRange(min=0), default=4, show_default=True,
              help="Data batches the fidelity before/after is measured on (besides the example input).")
@click.option("--log-every", type=click.IntRange(min=1), default=None,
              help="Steps between progress lines (default: about 20 a run).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint file, written atomically at the end and every --checkpoint-every steps: the model, "
                   "optimizer, scheduler, RNG states and data position. With --resume, continued from.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, help="Steps between checkpoints.")
@click.option("--resume", is_flag=True, help="Continue from --checkpoint (same weights as an uninterrupted run).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Where to write the healed model.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@handle_errors
def heal(model: str, input_shape: Optional[tuple[int, ...]], example_inputs: Optional[str], arch: Optional[str],
         arch_args: tuple[str, ...], trust_pickle: bool, rewritten: str, data: str, calib_size: Optional[str], calib_preset: Optional[str],
         calib_mean: Optional[str], calib_std: Optional[str], steps: int, lr: float, schedule: str, warmup: int,
         layer_weight: float, output_loss: str, trainable: str, train_mode: bool, batch_size: int, seed: int,
         shuffle: bool, device: str, fidelity_batches: int, log_every: Optional[int], checkpoint: Optional[str],
         checkpoint_every: Optional[int], resume: bool, output: str, force: bool, **load_options: Any) -> None:
    """Distil the original MODEL into the rewritten model for a few steps (no labels).

    Under torchrun (`torchrun --nproc_per_node=N --standalone -m dsrewrite heal ...`) each process
    takes its share of the batches, gradients are averaged, and rank 0 alone writes and prints.
    """
    from ..calib_data import open_calibration
    from ..io import check_outputs, load_model
    from ..refit.heal_run import heal_to_file, resolve_device
    from ..report.text import fidelity_change_line

    check_outputs({"-o": output, "--checkpoint": checkpoint},  # all together, before any work
                  inputs={"MODEL": model if path_exists(model) else None, "--rewritten": rewritten, "--data": data if path_exists(data) else None},
                  force=force, replaceable=("--checkpoint",) if resume else ())  # --resume continues it
    if checkpoint_every is not None and checkpoint is None:
        raise UsageError("--checkpoint-every needs --checkpoint FILE (where to write them).")
    if resume and checkpoint is None:
        raise UsageError("--resume needs --checkpoint FILE (the checkpoint to continue from).")
    resolve_device(device)  # a bad --device is refused before any work
    loaded = load_model_arg(model, arch, arch_args, trust_pickle, **load_options)
    x, shape = example_inputs_of(loaded, input_shape, example_inputs)
    with trust_warnings():
        student = load_model(rewritten, trust_pickle=trust_pickle, allow_modules=load_options["allow_modules"],
                             allow_globals=load_options["allow_globals"]).model
    source = open_calibration(data, input_shape=shape, size=calib_size, preset=calib_preset, mean=calib_mean,
                              std=calib_std, batch_size=batch_size)
    run = heal_to_file(loaded.model, student, source, output=output, overwrite=force, steps=steps, example_inputs=x, device=device,
                       seed=seed, shuffle=shuffle, fidelity_batches=fidelity_batches, task_metric=loaded.task_metric,
                       lr=lr, schedule=schedule, warmup=warmup, layer_weight=layer_weight, output_loss=output_loss,
                       trainable=trainable, train_mode=train_mode, checkpoint=checkpoint,
                       checkpoint_every=checkpoint_every, resume=resume, log_every=log_every,
                       progress=False)  # progress goes through logging (-v/-q)
    if run.rank != 0:
        return  # under torchrun only rank 0 prints (and wrote the file)
    res = run.result
    if res.losses[res.start_step:]:
        hist = res.losses
        click.echo(f"distillation loss {hist[res.start_step]:.4g} -> {hist[-1]:.4g} over steps "
                   f"{res.start_step + 1}..{res.step} on {run.device}"
                   f"{f' x {run.world_size} processes' if run.world_size > 1 else ''} ({res.images} samples drawn "
                   f"{'by rank 0 ' if run.world_size > 1 else ''}"
                   f"from the {source.count} in {data}{', resumed' if res.start_step else ''})")
    labels = {"example": "on the example input", "data": "on the first healing batches"}
    for key, fid in run.before.items():
        click.echo(fidelity_change_line(labels[key], fid, run.after[key]))
    if run.task is not None:
        name, before, after = run.task
        click.echo(f"task metric {name}: rewritten {before:.2f} → healed {after:.2f}")
    click.echo(f"wrote {output}", err=True)
