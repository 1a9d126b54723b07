# SPDX-License-Identifier: Apache-2.0
"""One healing job as ``dsrewrite heal`` runs it: device, processes, data order, fidelity before/after, the file.

:func:`heal_to_file` takes the loaded original and rewritten models and the opened data
(:func:`~dsrewrite.refit.calib_data.open_calibration`) and

1. picks the device (:func:`resolve_device`: ``auto`` is ``cuda:LOCAL_RANK`` when CUDA is
   available, else the CPU) and, under ``torchrun``, joins the process group;
2. puts the data in a seeded order (:class:`~dsrewrite.refit.order.SeededBatches`: shuffled
   per epoch by ``seed``, resumable by position);
3. measures the fidelity (:func:`~dsrewrite.measure.fidelity.compare_outputs`, the report's
   terms) on the example input and on the first ``fidelity_batches`` batches, and the task
   metric when the model comes with one, before and after :func:`~dsrewrite.refit.heal.heal`;
4. on rank 0 only, writes the healed model atomically (on the device it was loaded on);
5. leaves the process group it joined.

Only rank 0 measures and writes; every rank returns a :class:`HealRun` (``rank`` says which).
"""

from __future__ import annotations

import copy
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

from .batches import input_spec, iter_inputs
from .heal import HealResult, heal, init_distributed
from .order import SeededBatches
from ..errors import UsageError
from ..measure.fidelity import Fidelity, compare_outputs
from ..runtime.files import atomic_save
from ..runtime.log import get_logger

__all__ = ["HealRun", "heal_to_file", "resolve_device", "seeded_order"]

_log = get_logger("heal")


@dataclass(frozen=True)
class HealRun:
    """What one process of :func:`heal_to_file` did. ``before``/``after``: fidelity by input set
    (``"example"``, ``"data"``), ``task``: (name, before, after) or None; both empty on ranks other than 0."""

    result: HealResult
    rank: int
    world_size: int
    device: str
    output: Optional[Path]
    before: dict[str, Fidelity] = field(default_factory=dict)
    after: dict[str, Fidelity] = field(default_factory=dict)
    task: Optional[tuple[str, float, float]] = None


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """The training device: ``auto``/None: ``cuda`` when available, else ``cpu``; a bare ``cuda`` under
    ``torchrun`` is ``cuda:LOCAL_RANK`` (else ``cuda:0``).

    Raises:
        UsageError: not a device name, or CUDA asked for and not available.

    Example:
        >>> resolve_device("cpu"), resolve_device("auto").type in ("cpu", "cuda")
        (device(type='cpu'), True)
    """
    text = "auto" if device is None else str(device)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {text!r} is not a device: {exc}. Valid: auto, cpu, cuda, cuda:N.") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available here. Hint: --device cpu (or auto).")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def seeded_order(loader: Any, *, seed: int, shuffle: bool) -> SeededBatches:
    """The opened data (a ``DataLoader`` over a dataset, or a list of ready batches) in a seeded order."""
    if isinstance(loader, DataLoader):
        return SeededBatches(loader.dataset, loader.batch_size, seed=seed, shuffle=shuffle,
                             num_workers=loader.num_workers)
    return SeededBatches(list(loader), None, seed=seed, shuffle=shuffle)


def _measure(original: nn.Module, student: nn.Module, sets: dict[str, list[Any]]) -> dict[str, Fidelity]:
    return {k: compare_outputs(original, student, v) for k, v in sets.items() if v}


def heal_to_file(
    original: nn.Module,
    student: nn.Module,
    data: Any,
    *,
    output: Union[str, os.PathLike, None],
    steps: int,
    overwrite: bool = True,
    example_inputs: Any = None,
    device: Union[str, torch.device, None] = "auto",
    seed: int = 0,
    shuffle: bool = True,
    fidelity_batches: int = 4,
    task_metric: Any = None,
    **heal_options: Any,
) -> HealRun:
    """Heal ``student`` (IN PLACE) from ``original`` on ``data`` and write it to ``output`` (rank 0).

    ``data`` is a :class:`~dsrewrite.refit.calib_data.CalibrationData` (its ``loader``) or the
    loader itself; ``heal_options`` go to :func:`~dsrewrite.refit.heal.heal` (``lr``,
    ``schedule``, ``warmup``, ``layer_weight``, ``output_loss``, ``trainable``, ``checkpoint``,
    ``checkpoint_every``, ``resume``, ...). ``output`` None: write nothing; ``overwrite`` False: an existing
    ``output`` is never replaced (the final step is an exclusive create, as `dsrewrite heal` without --force).

    Raises:
        UsageError: a bad device or option (from :func:`heal`), missing checkpoint.
        OutputError: the model cannot be written (nothing partial is left).
    """
    dev = resolve_device(device)
    import torch.distributed as dist

    joined = dist.is_available() and not dist.is_initialized()
    rank, world = init_distributed(dev)
    try:
        loader = getattr(data, "loader", data)
        order = seeded_order(loader, seed=seed, shuffle=shuffle)
        home = next((p.device for p in student.parameters()), torch.device("cpu"))
        before: dict[str, Fidelity] = {}
        after: dict[str, Fidelity] = {}
        task = None
        sets: dict[str, list[Any]] = {}
        if rank == 0:
            spec = input_spec(original, example_inputs, input_key=heal_options.get("input_key"),
                              input_fn=heal_options.get("input_fn"), where="heal")
            sets = {"example": [example_inputs] if example_inputs is not None else [],
                    "data": list(iter_inputs(itertools.islice(loader, fidelity_batches), spec))}
            _log.info("[heal] measuring fidelity before healing ...")
            before = _measure(original, student, sets)
            task_before = task_metric(student) if task_metric is not None else None
        teacher = original
        if next((p.device for p in original.parameters()), dev) != dev:
            teacher = copy.deepcopy(original).to(dev)
        result = heal(student, teacher, order, steps=steps, device=dev, example_inputs=example_inputs,
                      **heal_options)
        student.to(home)
        written = None
        if rank == 0:
            after = _measure(original, student, sets)
            if task_metric is not None:
                task = (task_metric.name, task_before, task_metric(student))
            if output is not None:
                written = atomic_save(student, Path(output), overwrite=overwrite)
        if world > 1:
            dist.barrier()
        return HealRun(result, rank, world, str(dev), written, before, after, task)
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()
