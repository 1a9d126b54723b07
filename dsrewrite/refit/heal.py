# SPDX-License-Identifier: Apache-2.0
"""Healing: a short, label-free distillation of the original model into the rewritten one.

The original is the frozen teacher. The loss is

    MSE(student output, teacher output) + layer_weight · Σ_l MSE(block_l output, conv_l output)

over the replaced layers ``l`` (the student's separable block against the
teacher's conv at the same qualified name, on the same batch; no labels).
Adam updates the rewritten model in place (all its trainable parameters, or
only the replaced blocks).

Adam's rate follows a schedule (:mod:`~dsrewrite.refit.schedule`, a ``LambdaLR``).
Checkpoints (:mod:`~dsrewrite.refit.heal_state`) hold the step, the model, optimizer and
scheduler states, the RNG states and the data position; ``resume=True`` continues from the
checkpoint so that a killed-and-resumed run ends with the weights of an uninterrupted one
(bitwise on CPU) when ``data`` gives the same order each pass, or is a
:class:`~dsrewrite.refit.order.SeededBatches` (seeded shuffling, resumed without re-reading).
Progress goes to the ``dsrewrite.heal`` logger every ``log_every`` steps; ``callback``
receives a :class:`HealStep` after every step (for your own tracker). Under ``torchrun`` the
student is wrapped in ``DistributedDataParallel`` (gloo on CPU, nccl on CUDA):
each process takes every ``world_size``-th batch of ``data`` and the gradients are
averaged, so 2 processes with batches of ``B`` match 1 process with batches of ``2B``.

    torchrun --nproc_per_node=2 --standalone -m dsrewrite heal M --rewritten R --data D -o OUT

(``python -m dsrewrite heal`` runs the ``dsrewrite heal`` command; a script that
calls :func:`heal` under ``torchrun`` works the same way.)

Example:
    >>> import copy, torch
    >>> from torch import nn
    >>> from dsrewrite.layers import DepthwiseSeparableConv2d
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    >>> light = copy.deepcopy(net); light[2] = DepthwiseSeparableConv2d.from_conv(net[2])
    >>> res = heal(light, net, [torch.randn(4, 3, 8, 8)], steps=20, lr=1e-2, progress=False)
    >>> res.losses[-1] < res.losses[0]
    True
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batches import batch_size_of, check_iterable, input_spec, model_inputs, to_device
from .calibrate import CalibrationUsageError, replaced_names
from .heal_state import CHECKPOINT_FORMAT, load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from .order import SeededBatches, stream
from .choices import OUTPUT_LOSSES, SCHEDULES, TRAINABLE
from .schedule import factor, make_scheduler
from ..errors import CalibrationError, did_you_mean
from ..runtime.log import get_logger, say
from ..runtime.run import call_model, flatten_outputs
from ..kinds import kind_of

__all__ = ["heal", "HealResult", "HealStep", "init_distributed", "TRAINABLE", "SCHEDULES", "OUTPUT_LOSSES",
           "CHECKPOINT_FORMAT"]

_log = get_logger("heal")


@dataclass
class HealResult:
    """Loss history of one :func:`heal` call (steps ``start_step + 1 … step``).

    ``losses`` is the total loss per step, ``output_losses`` and ``layer_losses``
    its two terms (``layer_losses`` before the ``layer_weight`` factor). Under DDP the
    values are averaged over the processes. ``images``: samples this process drew from
    ``data`` in this call (repeats counted: ``data`` is cycled for as many steps as asked).
    ``batches_consumed``: the data position at the end (global batches, all processes).
    """

    step: int
    start_step: int
    losses: list[float] = field(default_factory=list)
    output_losses: list[float] = field(default_factory=list)
    layer_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    world_size: int = 1
    checkpoint: Optional[str] = None
    images: int = 0
    batches_consumed: int = 0


@dataclass(frozen=True)
class HealStep:
    """What :func:`heal` hands its ``callback`` after each step (on every process; ``rank`` says which).

    ``lr`` is the rate the step used; the losses are averaged over the processes under DDP;
    ``epoch``/``index``: where the step's batch (this process's) sits in the data order.
    """

    step: int
    steps: int
    loss: float
    output_loss: float
    layer_loss: float
    lr: float
    epoch: int
    index: int
    rank: int = 0


def init_distributed(device: Optional[Union[str, torch.device]] = None) -> tuple[int, int]:
    """Join the process group ``torchrun`` set up (gloo on CPU, nccl on CUDA); return ``(rank, world_size)``.

    Does nothing (returns ``(0, 1)``) outside ``torchrun`` (``WORLD_SIZE`` unset or 1),
    and returns the existing group's values when one is already initialised. With CUDA,
    pins this process to ``cuda:LOCAL_RANK`` first.

    Example:
        >>> init_distributed() if "WORLD_SIZE" not in os.environ else (0, 1)
        (0, 1)
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return 0, 1
    dev = torch.device(device) if device is not None else None
    cuda = torch.cuda.is_available() and (dev is None or dev.type == "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _output_loss(out: Any, ref: Any, kind: str) -> Tensor:
    a = [t for _, t in flatten_outputs(out)]
    b = [t for _, t in flatten_outputs(ref)]
    if len(a) != len(b) or not a:
        raise CalibrationError(
            f"heal: the rewritten model returns {len(a)} output tensors, the original {len(b)}. "
            "Hint: heal a model against the one it was rewritten from."
        )
    total = torch.zeros((), device=a[0].device)
    for x, y in zip(a, b):
        if kind == "kl" and x.dim() >= 2 and x.shape[1] > 1:  # logits: classes on dim 1
            total = total + F.kl_div(F.log_softmax(x.float(), 1), F.log_softmax(y.float(), 1),
                                     reduction="sum", log_target=True) / (x.numel() / x.shape[1])
        else:
            total = total + F.mse_loss(x.float(), y.float())
    return total


def heal(
    rewritten: nn.Module,
    original: nn.Module,
    data: Iterable[Any],
    *,
    steps: int,
    lr: float = 1e-4,
    layer_weight: float = 1.0,
    names: Optional[Sequence[str]] = None,
    schedule: str = "constant",
    warmup: int = 0,
    output_loss: str = "mse",
    trainable: str = "all",
    train_mode: bool = False,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: Optional[int] = None,
    resume: bool = False,
    progress: bool = True,
    log_every: Optional[int] = None,
    callback: Optional[Callable[[HealStep], None]] = None,
    device: Optional[Union[str, torch.device]] = None,
    shard: bool = True,
    input_key: Optional[Any] = None,
    input_fn: Optional[Any] = None,
    example_inputs: Any = None,
) -> HealResult:
    """Distil ``original`` into ``rewritten`` (IN PLACE) for ``steps`` optimizer steps in total.

    Args:
        rewritten: the student, trained in place (moved to ``device`` when given).
        original: the frozen teacher (never modified; copied when it must move to ``device``).
        data: re-iterable batches (a list, a DataLoader) as the user has them: tensors,
            ``(input, mask/label, ...)`` tuples, dicts (with ``input_key``), or anything ``input_fn``
            maps (:func:`dsrewrite.batches.model_inputs`); streamed, not kept, and cycled as long
            as ``steps`` needs: every batch is used once before any is used twice. A
            :class:`~dsrewrite.refit.order.SeededBatches` shuffles each epoch by its seed and is
            resumed without re-reading the batches before the checkpoint's position; any other
            iterable is re-read from its start and skipped (exact when each pass gives the same order).
        steps: total number of steps, counting those a resumed checkpoint already did.
        lr: Adam learning rate.
        layer_weight: weight of the per-layer terms (0: output only).
        names: replaced layers for the layer terms; default: every separable block of
            ``rewritten`` that is an ``nn.Conv2d`` in ``original``.
        schedule: ``"constant"`` learning rate, ``"cosine"`` or ``"linear"`` decay to 0 at step
            ``steps`` (:mod:`dsrewrite.refit.schedule`: a function of the global step and ``steps``,
            so a resumed run with the same ``steps`` continues the same curve).
        warmup: steps of linear warm-up from 0 to ``lr`` at the start (any schedule).
        output_loss: ``"mse"`` on every output tensor, or ``"kl"``: KL divergence of the
            softmax over dim 1 (logits: classification, segmentation), MSE for other outputs.
        trainable: ``"all"`` (every parameter that requires grad) or ``"replaced"``
            (only the named blocks).
        train_mode: run the student in train mode (BatchNorm statistics update);
            default eval mode, the right choice for a short label-free run.
        checkpoint: file written atomically at the end (and every ``checkpoint_every`` steps), by rank 0.
        resume: continue from ``checkpoint`` (its step, weights, optimizer and scheduler states, RNG
            states, data position and history).
        progress: print the progress lines to a terminal's stderr (rank 0) when no ``logging`` handler shows them.
        log_every: steps between progress lines (``dsrewrite.heal`` logger, INFO); default ~20 lines a run.
        callback: called with a :class:`HealStep` after every step, on every process.
        device: where to train; default: the student's device (``cuda:LOCAL_RANK`` under torchrun with CUDA).
        shard: under DDP, each process takes every ``world_size``-th batch of ``data``; pass
            False when ``data`` is already per-process (a DataLoader with a DistributedSampler).
        input_key: key of the model input in dict batches.
        input_fn: ``batch -> model inputs`` for any other batch structure.
        example_inputs: the example inputs; their number of positional inputs says how a tuple
            batch maps to a multi-input model (default: ``forward``'s parameters without default).

    Raises:
        CalibrationUsageError: bad options, missing/unreadable checkpoint (or one of an older format),
            empty data.
        BatchError: a batch cannot be mapped to model inputs (a ``UsageError``).

    Example:
        >>> from dsrewrite.kinds.separable import DepthwiseSeparableConv2d
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3))
        >>> light = nn.Sequential(DepthwiseSeparableConv2d.from_conv(net[0]))
        >>> heal(light, net, [torch.randn(1, 3, 6, 6)], steps=2, progress=False).step
        2
    """
    t0 = time.perf_counter()
    if not isinstance(steps, int) or steps < 0:
        raise CalibrationUsageError(f"heal: steps must be an int >= 0, got {steps!r}.")
    if not 0 < lr < math.inf or not 0 <= layer_weight < math.inf:  # NaN and inf refused too
        raise CalibrationUsageError(f"heal: need a finite lr > 0 and layer_weight >= 0, got lr={lr}, layer_weight={layer_weight}.")
    for opt_name, value, options in (("trainable", trainable, TRAINABLE), ("schedule", schedule, SCHEDULES),
                                     ("output_loss", output_loss, OUTPUT_LOSSES)):
        if value not in options:
            raise CalibrationUsageError(
                f"heal: {opt_name}={value!r} is not one of {options}{did_you_mean(value, options)}."
            )
    if not isinstance(warmup, int) or warmup < 0:
        raise CalibrationUsageError(f"heal: warmup must be an int >= 0, got {warmup!r}.")
    if log_every is not None and log_every < 1:
        raise CalibrationUsageError(f"heal: log_every must be >= 1 or None, got {log_every}.")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise CalibrationUsageError(f"heal: checkpoint_every must be >= 1 or None, got {checkpoint_every}.")
    if resume and checkpoint is None:
        raise CalibrationUsageError("heal: resume=True needs checkpoint=<path>. Hint: pass the file to continue from.")
    ckpt_path = Path(checkpoint) if checkpoint is not None else None

    rank, world = init_distributed(device)
    if device is None and world > 1 and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    p0 = next(iter(rewritten.parameters()), None)
    dev = torch.device(device) if device is not None else (p0.device if p0 is not None else torch.device("cpu"))
    if device is not None:
        rewritten.to(dev)
    teacher = original
    t_param = next(iter(original.parameters()), None)
    if t_param is not None and t_param.device != dev:
        teacher = copy.deepcopy(original).to(dev)

    check_iterable(data, "heal")
    spec = input_spec(original, example_inputs, input_key=input_key, input_fn=input_fn, where="heal")
    names = list(names) if names is not None else replaced_names(original, rewritten)
    blocks = dict(rewritten.named_modules())
    convs = dict(teacher.named_modules())
    for n in names:
        if n not in blocks or kind_of(blocks[n]) is None or n not in convs:
            raise CalibrationUsageError(
                f"heal(names=...): {n!r} must be a replacement block (a DepthwiseSeparableConv2d or another "
                f"registered kind's) in the rewritten model and a module "
                f"of the original{did_you_mean(n, [k for k, v in blocks.items() if kind_of(v) is not None])}."
            )

    flags = [(m, m.training) for m in rewritten.modules()] + [(m, m.training) for m in teacher.modules()]
    grads = [(p, p.requires_grad) for p in rewritten.parameters()]
    handles: list[Any] = []
    result = HealResult(step=0, start_step=0, world_size=world,
                        checkpoint=str(ckpt_path) if ckpt_path is not None else None)
    try:
        if trainable == "replaced":
            keep = {id(p) for n in names for p in blocks[n].parameters()}
            for p, _ in grads:
                p.requires_grad_(p.requires_grad and id(p) in keep)
        params = [p for p in rewritten.parameters() if p.requires_grad]
        if not params:
            raise CalibrationUsageError(
                "heal: the rewritten model has no trainable parameter (requires_grad=False everywhere"
                + (" outside the replaced blocks" if trainable == "replaced" else "") + "). Hint: unfreeze it."
            )
        rewritten.train(train_mode)
        teacher.eval()
        opt = torch.optim.Adam(params, lr=lr)
        sched = make_scheduler(opt, steps=steps, schedule=schedule, warmup=warmup)
        start = consumed = 0
        if resume:
            assert ckpt_path is not None  # checked above
            ckpt = load_checkpoint(ckpt_path)
            try:
                rewritten.load_state_dict(ckpt["model"])
                opt.load_state_dict(ckpt["optimizer"])
                sched.load_state_dict(ckpt["scheduler"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CalibrationUsageError(
                    f"heal(resume=True): checkpoint {str(ckpt_path)!r} does not fit this model/optimizer: {exc}. "
                    "Hint: resume with the same rewritten model and the same `trainable` option."
                ) from exc
            start = int(ckpt["step"])
            consumed = int(ckpt["data"]["consumed"])
            restore_rng_states(ckpt.get("rng", {}))
            was = {k: ckpt.get(k) for k in ("lr", "steps", "schedule", "warmup")}
            now = {"lr": lr, "steps": steps, "schedule": schedule, "warmup": warmup}
            if was != now:  # the new options apply from the next step on
                _log.warning("heal: resuming %s with %s (the checkpoint was written with %s): the learning-rate "
                             "curve differs from the first run's", ckpt_path, now, was)
                sched.base_lrs = [lr for _ in sched.base_lrs]
                for g in opt.param_groups:
                    g["initial_lr"], g["lr"] = lr, lr * factor(start + 1, steps, schedule, warmup)
            hist = ckpt.get("history", {})
            result.losses = list(hist.get("losses", []))
            result.output_losses = list(hist.get("output_losses", []))
            result.layer_losses = list(hist.get("layer_losses", []))
        result.start_step = result.step = start

        model: nn.Module = rewritten
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(rewritten, device_ids=[dev.index] if dev.type == "cuda" else None)

        s_out: dict[str, Tensor] = {}
        t_out: dict[str, Tensor] = {}

        def keep_s(name: str) -> Any:
            return lambda mod, args, out: s_out.__setitem__(name, out)

        def keep_t(name: str) -> Any:
            return lambda mod, args, out: t_out.__setitem__(name, out)

        if layer_weight > 0:
            for n in names:
                handles.append(blocks[n].register_forward_hook(keep_s(n)))
                handles.append(convs[n].register_forward_hook(keep_t(n)))

        length = len(data) if isinstance(data, SeededBatches) else None

        def save(step: int) -> None:
            if ckpt_path is None or rank != 0:
                return
            position: dict[str, int] = {"consumed": consumed}
            if length:
                position["epoch"], position["index"] = divmod(consumed, length)
            save_checkpoint(ckpt_path, {
                "step": step, "model": rewritten.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": rng_states(), "data": position, "world_size": world,
                "names": list(names), "lr": lr, "steps": steps, "schedule": schedule, "warmup": warmup,
                "layer_weight": layer_weight,
                "history": {"losses": result.losses, "output_losses": result.output_losses,
                            "layer_losses": result.layer_losses},
            })

        every = log_every or max(1, (steps - start) // 20)
        show = progress and rank == 0 and sys.stderr.isatty()
        if start < steps:
            say(_log, f"[heal] steps {start + 1}..{steps} on {dev} ({world} process{'es' if world > 1 else ''})"
                + (f", resumed from {ckpt_path} at batch {consumed}" if resume else ""), echo=show)
        per_step = world if shard else 1
        batches = stream(data, first=consumed, rank=rank, world=world) if shard else \
            stream(data, first=consumed, rank=0, world=1)
        for step in range(start + 1, steps + 1):
            epoch, index, raw = next(batches)
            batch = to_device(model_inputs(raw, index, spec), dev)
            result.images += batch_size_of(batch)
            rate = opt.param_groups[0]["lr"]
            s_out.clear()
            t_out.clear()
            with torch.no_grad():
                ref = call_model(teacher, batch)
            out = call_model(model, batch)
            out_loss = _output_loss(out, ref, output_loss)
            lay_loss = sum((F.mse_loss(s_out[n].float(), t_out[n].float()) for n in names if n in s_out and n in t_out),
                           torch.zeros((), device=out_loss.device))
            loss = out_loss + layer_weight * lay_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            consumed += per_step
            vals = torch.stack([loss.detach(), out_loss.detach(), lay_loss.detach()]).float()
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(vals)
                vals /= world
            lv, ov, yv = (float(v) for v in vals.cpu())
            result.losses.append(lv)
            result.output_losses.append(ov)
            result.layer_losses.append(yv)
            result.step = step
            if callback is not None:
                callback(HealStep(step, steps, lv, ov, yv, rate, epoch, index, rank))
            if rank == 0 and (step % every == 0 or step in (start + 1, steps)):
                say(_log, f"[heal] step {step}/{steps} loss {lv:.4g} (output {ov:.4g}, layers {yv:.4g}) lr {rate:.3g}",
                    echo=show)
            if checkpoint_every is not None and step % checkpoint_every == 0 and step < steps:
                save(step)
        save(result.step)
        result.batches_consumed = consumed
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
    finally:
        for h in handles:
            h.remove()
        for m, f in flags:
            m.training = f
        for p, rg in grads:
            p.requires_grad_(rg)
    result.seconds = time.perf_counter() - t0
    return result

