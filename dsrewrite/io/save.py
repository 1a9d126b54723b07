# SPDX-License-Identifier: Apache-2.0
"""Atomic saving, output-path checks, and the rewritten model + plan sidecar round trip.

Every write goes to a temporary file in the destination's directory, is flushed
and fsync'ed, then ``os.replace``'d over the destination: a reader sees the old
file or the new one, never a partial one, and a failed write removes its
temporary file and leaves any previous file untouched.

``save_rewrite`` writes two files: the rewritten full module (``torch.save``) at
``out.pt`` and the plan as JSON at ``out.plan.json`` (which records the arch spec
and its arguments when the model was built from one). ``load_rewrite`` rebuilds
the rewrite on a fresh instance of the architecture (given, or built from the
plan's arch spec) from the plan and loads the weights from either file kind: a
state-dict file (read with ``weights_only=True``) or the full-module ``out.pt`` itself (read by the safe loader, of which
only the ``state_dict()`` is used).

Example:
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> atomic_write_bytes(b"hello", d / "a.txt").read_bytes()
    b'hello'
    >>> default_output_path("timm:resnet18")
    PosixPath('timm_resnet18.ds.pt')
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

from ..errors import ModelLoadError, OutputError, did_you_mean
from ..planning.types import MAX_PLAN_CHARS, Plan
from ..runtime.input_files import input_file
from ..runtime.files import PathLike, atomic_save, atomic_write_all, atomic_write_bytes
from .paths import check_output_path, default_output_path, plan_path_for
from .saveable import check_saveable

if TYPE_CHECKING:
    from .arch_spec import ArchSpec

__all__ = [
    "atomic_write_bytes",
    "atomic_save",
    "check_output_path",
    "default_output_path",
    "plan_path_for",
    "save_rewrite",
    "load_rewrite",
]

#: What :func:`save_rewrite` can write: the full module (torch.save) or the weights as safetensors.
SAVE_FORMATS: tuple[str, ...] = ("torch", "safetensors")


def save_rewrite(
    model: nn.Module,
    plan: Plan,
    path: PathLike,
    *,
    force: bool = False,
    input_path: Optional[PathLike] = None,
    save_format: str = "torch",
    arch: Optional["ArchSpec"] = None,
) -> tuple[Path, Path]:
    """Write the rewritten model to ``path`` and the plan JSON beside it; return both paths.

    ``save_format="torch"`` writes the full module (``torch.save(model)``);
    ``"safetensors"`` writes its state dict as a ``.safetensors`` file (tensors only, no
    pickle; shared tensors are stored once each), which :func:`load_rewrite` and
    ``load_model(path, arch=...)`` read back with the plan.

    ``arch`` (the :class:`~dsrewrite.io.arch.ArchSpec` the model was built from,
    ``LoadedModel.arch``) is recorded in the plan as ``arch`` and ``arch_args``,
    so that :func:`load_rewrite` can rebuild the same architecture.

    Both paths are checked (:func:`check_output_path`) before anything is
    written, and the pair is written all-or-nothing: both temp files are written
    and fsync'ed before either replaces its destination, so a failure (disk full)
    leaves no new file, no temp file, and any previous files unchanged. Without
    ``force`` each file is placed by an exclusive create, so a file another process
    created meanwhile is never replaced (:class:`OutputError` instead). Reload with :func:`dsrewrite.io.load_model`
    (full module) or :func:`load_rewrite` (fresh architecture + plan + weights).

    Example:
        >>> import tempfile
        >>> from dsrewrite.plan_types import Plan
        >>> w, p = save_rewrite(nn.Linear(2, 2), Plan((), "decoder_only", "fx"), Path(tempfile.mkdtemp()) / "o.pt")
        >>> w.name, p.name
        ('o.pt', 'o.plan.json')
    """
    weights = Path(path)
    plan_file = plan_path_for(weights)
    if save_format not in SAVE_FORMATS:
        raise OutputError(f"unknown save format {save_format!r}{did_you_mean(save_format, SAVE_FORMATS)}; "
                          f"choose one of {', '.join(SAVE_FORMATS)}.")
    if save_format == "safetensors" and weights.suffix != ".safetensors":
        raise OutputError(f"{weights}: a safetensors file needs the .safetensors suffix (the loader reads the "
                          "format from it).")
    check_output_path(weights, input_path=input_path, force=force)
    check_output_path(plan_file, input_path=input_path, force=force)
    check_saveable(model, save_format)
    if arch is not None:
        plan = dataclasses.replace(plan, arch=arch.spec, arch_args=arch.kwargs)
    data = plan.to_json().encode("utf-8")
    if save_format == "safetensors":
        blob = _safetensors_bytes(model)
        write_weights: Callable[[IO[bytes]], Any] = lambda f: f.write(blob)  # noqa: E731
    else:
        write_weights = lambda f: torch.save(model, f)  # noqa: E731
    atomic_write_all([(weights, write_weights), (plan_file, lambda f: f.write(data))], overwrite=force)
    return weights, plan_file


def _safetensors_bytes(model: nn.Module) -> bytes:
    """The model's state dict as safetensors bytes (contiguous CPU copies; tied tensors each stored)."""
    import safetensors.torch

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return safetensors.torch.save(tensors, metadata={"format": "pt", "producer": "dsrewrite"})


def load_rewrite(fresh_model: Optional[nn.Module], plan_path: PathLike, weights_path: PathLike, *,
                 trust_arch: bool = False) -> nn.Module:
    """Rebuild a saved rewrite: apply the plan to a copy of ``fresh_model``, then load the weights.

    With ``fresh_model=None`` the architecture is built from the arch spec and
    arguments the plan records (random weights, never a download). A
    ``package.module:factory`` spec imports and runs code named by the plan file,
    so it is refused unless ``trust_arch=True``; library specs (``timm:``,
    ``torchvision:``, ``smp:``, ``demo``) are always admitted, their arguments
    checked as on the command line. ``weights_path`` may be a state-dict file (``torch.save(model.state_dict())``,
    read with ``weights_only=True``) or the full-module file written by
    :func:`save_rewrite` (read by the safe loader; only its
    ``state_dict()`` is used). ``fresh_model`` is not modified.

    Raises:
        ModelLoadError: a file is missing or unreadable, the weights do not fit, or
            ``fresh_model`` is None and the plan records no (admissible) arch spec.
        PlanError: the plan is not valid or does not fit ``fresh_model``.

    Example:
        >>> import tempfile
        >>> from dsrewrite.plan_types import Plan
        >>> d = Path(tempfile.mkdtemp()); m = nn.Linear(2, 2)
        >>> w, p = save_rewrite(m, Plan((), "decoder_only", "fx"), d / "o.pt")
        >>> torch.equal(load_rewrite(nn.Linear(2, 2), p, w).weight, m.weight)
        True
        >>> from dsrewrite.io import build_arch
        >>> from dsrewrite.io.arch import arch_spec
        >>> a = arch_spec("timm:resnet18", {"num_classes": 7})
        >>> w, p = save_rewrite(build_arch(a), Plan((), "all_3x3", "fx"), d / "r18.pt", arch=a)
        >>> load_rewrite(None, p, w).fc.out_features  # rebuilt from the plan's arch and arch_args
        7
    """
    from ..planning.apply import apply_plan
    from ..runtime.preflight import unwrap_parallel
    from .load import extract_state_dict, fit_state_dict, read_torch_file

    plan_path = input_file(plan_path, "plan file", ModelLoadError, max_bytes=MAX_PLAN_CHARS,
                           hint="Pass the .plan.json written next to the rewritten model.")
    try:
        text = plan_path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read plan file {plan_path}: {exc.strerror or exc}. Pass the .plan.json "
                             "written next to the rewritten model.") from exc
    plan = Plan.from_json(text, source=str(plan_path))
    if fresh_model is None:
        fresh_model = _build_recorded_arch(plan, plan_path, trust_arch=trust_arch)
    model = apply_plan(fresh_model, plan, inplace=False, init="random")
    obj, _how = read_torch_file(weights_path)
    if isinstance(obj, nn.Module):
        sd = unwrap_parallel(obj)[0].state_dict()
    else:
        sd, _where = extract_state_dict(obj, source=str(weights_path))
    fit_state_dict(model, sd, source=str(weights_path), arch=f"{type(fresh_model).__name__} + plan {plan_path.name}")
    return model


def _build_recorded_arch(plan: Plan, plan_path: Path, *, trust_arch: bool) -> nn.Module:
    """The fresh architecture a plan records (``arch``, ``arch_args``), built with random weights."""
    from .arch import arch_spec, build_arch

    if plan.arch is None:
        raise ModelLoadError(
            f"{plan_path} records no arch spec (the model came from a full-module file, or the plan is from an "
            "older dsrewrite): pass a fresh instance of the architecture as fresh_model."
        )
    try:
        spec = arch_spec(plan.arch, plan.arch_args)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{plan_path}: {exc}") from None
    if spec.library == "factory" and not trust_arch:
        raise ModelLoadError(
            f"{plan_path} names the factory {spec}; a plan file never makes dsrewrite import and run code: "
            "pass trust_arch=True if you trust it, or build the model and pass it as fresh_model."
        )
    return build_arch(spec)
