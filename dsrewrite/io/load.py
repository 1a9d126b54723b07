# SPDX-License-Identifier: Apache-2.0
"""Load a model from a file (full-module pickle or checkpoint) or from an architecture spec.

``load_model(spec)`` accepts:

* ``"demo"``: the trained demo U-Net (:mod:`dsrewrite.shapes`); ``"demo:resnet18"``: the random-weight
  ResNet18 U-Net (:func:`dsrewrite.demo.demo_unet`);
* an **arch spec**, random weights, never a download: ``timm:resnet18``,
  ``torchvision:resnet18``, ``smp:Unet:resnet18`` (segmentation_models_pytorch
  ``arch[:encoder]``, ``encoder_weights=None``) or ``package.module:factory``,
  with keyword arguments ``arch_args`` (see :mod:`dsrewrite.io.arch`);
* a **file** written by ``torch.save``, always read by torch's weights-only unpickler
  with a per-file allowlist (:mod:`dsrewrite.io.safe_load`; ``trust_pickle=True``:
  plain ``torch.load``, which runs code from the file):

  - a full module (``torch.save(model)``, also of a ``torch.compile``'d model);
  - a checkpoint: a state dict, or a dict holding one under one of
    :data:`STATE_DICT_KEYS` (timm ``train.py``, Lightning, EMA copies; ``state_dict_key``
    chooses), loaded into ``arch``; wrapper prefixes (``module.``, ``_orig_mod.``,
    ``model.``, ``net.``) are stripped only when the stripped keys fit ``arch`` exactly;
  - a ``.safetensors`` file (a state dict; needs ``arch``).

``nn.DataParallel``/``DistributedDataParallel``/``torch.compile`` wrappers are unwrapped. Every
failure is a :class:`~dsrewrite.errors.ModelLoadError` (CLI exit 2) saying what
to do. Models come back in the train/eval mode they were saved in (arch specs:
train mode, as constructed).

Example:
    >>> m = load_model("torchvision:resnet18")
    >>> m.kind, type(m.model).__name__
    ('arch', 'ResNet')
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Union

import torch
from torch import nn

from ..errors import ModelLoadError, TrustedPickleWarning
from .arch import ARCH_EXAMPLES, ARCH_FLAG_EXAMPLES, ArchSpec, arch_spec, build_arch
from .arch_spec import DEMO_MODELS
from .meta_load import fit_on_meta
from .safe_load import safe_torch_load
from .state_dict import (  # noqa: F401  (re-exported: dsrewrite.io.load.X, old paths)
    STATE_DICT_KEYS,
    WRAPPER_PREFIXES,
    extract_state_dict,
    fit_state_dict,
    is_tensor_mapping,
    load_state_dict_checked,
)
from ..runtime.input_files import input_file, is_missing, path_exists
from ..runtime.preflight import unwrap_parallel

__all__ = [
    "LoadedModel",
    "load_model",
    "build_arch",
    "read_torch_file",
    "extract_state_dict",
    "load_state_dict_checked",
    "fit_state_dict",
    "WRAPPER_PREFIXES",
    "ARCH_EXAMPLES",
    "STATE_DICT_KEYS",
]

Kind = Literal["module", "state_dict", "arch", "demo"]

_FILE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".safetensors"}


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model and where it came from.

    ``source`` describes it for humans (file, format, unwrapping, arch);
    ``kind`` is ``"module"`` (full-module pickle), ``"state_dict"`` (checkpoint
    loaded into an arch), ``"arch"`` (random weights from an arch spec) or
    ``"demo"``; ``source_spec`` is the spec as given; ``path`` is the file, if any.
    ``arch`` is the architecture it was built from (kinds ``"arch"``, ``"state_dict"``,
    ``"demo"``; None for a full module), which a saved plan records. ``task_metric`` is a task metric
    with labelled data the source comes with (the trained demo's held-out mIoU), else None; ``input_shape`` the
    example input shape the source suggests when the user gives none (the trained demo: 1×3×128×128).
    """

    model: nn.Module
    source: str
    kind: Kind
    source_spec: str = ""
    path: Optional[Path] = None
    arch: Optional[ArchSpec] = None
    task_metric: Any = None
    input_shape: Optional[tuple[int, ...]] = None


# ----------------------------------------------------------------------------- arch specs


def _looks_like_arch(spec: str) -> bool:
    return ":" in spec and not any(sep in spec for sep in ("/", "\\")) and Path(spec).suffix not in _FILE_SUFFIXES



# ----------------------------------------------------------------------------- files


def _check_file(path: Path) -> str:
    """Return the format ('zip', 'legacy', 'safetensors') or raise a ModelLoadError."""
    if is_missing(path):
        raise ModelLoadError(f"model file not found: {path}. Check the path, or pass an arch spec ({ARCH_EXAMPLES}) or 'demo'.")
    input_file(path, "model file", ModelLoadError, folder_ok=True)  # names the OS refuses, FIFOs, devices, unreadable
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory; pass the model file written by torch.save.")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes); the save that wrote it probably failed. Re-save the model.")
    if path.suffix == ".safetensors":
        return "safetensors"
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            raise ModelLoadError(
                f"{path} is truncated or corrupt: a zip archive without its central directory "
                f"({size} bytes). Re-save or re-copy the file."
            )
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if not any(n.rsplit("/", 1)[-1] == "data.pkl" for n in names):
                raise ModelLoadError(
                    f"{path} is a zip archive but not a torch file (no data.pkl among {len(names)} entries); "
                    "expected a file written by torch.save (a model or a state dict)."
                )
            if any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in names):
                raise ModelLoadError(
                    f"{path} is a TorchScript archive; dsrewrite needs the eager nn.Module: save it with "
                    "torch.save(model), or save its state_dict and pass --arch."
                )
        return "zip"
    if head[:1] == b"\x80":
        return "legacy"
    raise ModelLoadError(
        f"{path} is not a torch file (it starts with {head!r}); expected a file written by torch.save "
        "(a model or a state dict)."
    )


def _corrupt(path: Path, exc: BaseException) -> ModelLoadError:
    if "Invalid magic number" in str(exc):
        return ModelLoadError(
            f"{path} is not a torch file (a pickle without torch's header); expected a file written by "
            "torch.save (a model or a state dict)."
        )
    return ModelLoadError(
        f"{path} could not be read as a torch file; it looks truncated or corrupt "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Re-save or re-copy the file."
    )


def read_torch_file(path: Union[str, os.PathLike], *, trust_pickle: bool = False,
                    map_location: Any = "cpu", allow_modules: Iterable[str] = (),
                    allow_globals: Iterable[str] = ()) -> tuple[Any, str]:
    """Read a ``torch.save`` (or ``.safetensors``) file; return the object and how it was read.

    Always torch's weights-only unpickler, with the per-file allowlist of
    :func:`dsrewrite.io.safe_load.safe_torch_load` (``allow_modules``/``allow_globals``
    extend it); ``trust_pickle=True`` reads with plain ``torch.load(weights_only=False)``,
    which runs code from the file.

    Example:
        >>> import tempfile, torch
        >>> p = Path(tempfile.mkdtemp()) / "sd.pt"; torch.save({"w": torch.ones(1)}, p)
        >>> read_torch_file(p)[1]
        'weights_only'
    """
    path = Path(path)
    fmt = _check_file(path)
    if fmt == "safetensors":
        try:
            import safetensors.torch

            device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
            return safetensors.torch.load_file(os.fspath(path), device=str(device)), "safetensors"
        except ImportError as exc:
            raise ModelLoadError(f"{path}: reading .safetensors needs the 'safetensors' package ({exc}).") from exc
        except Exception as exc:
            raise _corrupt(path, exc) from exc
    if trust_pickle:
        warnings.warn(
            f"{path}: read with --trust-pickle (trust_pickle=True): plain torch.load(weights_only=False) runs "
            "whatever code the file holds; use it only for files you made yourself.", TrustedPickleWarning,
            stacklevel=2,
        )
        try:
            return torch.load(path, map_location=map_location, weights_only=False), "trusted pickle"
        except Exception as exc:
            raise _corrupt(path, exc) from exc
    try:
        obj = safe_torch_load(path, map_location=map_location, allow_modules=allow_modules,
                              allow_globals=allow_globals)
        return obj, ("weights_only" if is_tensor_mapping(obj) or not isinstance(obj, nn.Module)
                     else "weights-only unpickler, per-file allowlist")
    except ModelLoadError:  # UnsafePickleError included
        raise
    except Exception as exc:
        raise _corrupt(path, exc) from exc


def _check_rebuilt(model: nn.Module, path: Path) -> nn.Module:
    """Refuse a module the unpickler could not rebuild whole (its submodule tree or state dict is broken).

    Quantized modules, for one, do not survive ``torch.save``/``torch.load`` in every
    torch version: they come back without their ``_modules``.
    """
    try:
        for _ in model.named_modules():
            pass
        model.state_dict()
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: the {type(model).__name__} in the file could not be rebuilt ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); torch.load returned a broken module "
            "(quantized modules, for one, do not survive torch.save/torch.load). Save the float model, or its "
            "state dict and pass --arch."
        ) from exc
    return model


# ----------------------------------------------------------------------------- entry point


def _holds_state_dict(obj: Mapping[Any, Any]) -> bool:
    return any(isinstance(k, str) and is_tensor_mapping(v) for k, v in obj.items())


def _fit_rewritten(model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path, arch: str) -> tuple[nn.Module, str]:
    """A rewritten model's weights (e.g. ``--save-format safetensors``): apply the plan sidecar, then fit.

    Re-raises the plain fit's error when there is no sidecar or the weights do not fit either way.
    """
    from .paths import plan_path_for

    plan_file = plan_path_for(path)
    if not path_exists(plan_file):
        fit_state_dict(model, sd, source=str(path), arch=arch)  # raises the plain error
    from ..planning.apply import apply_plan
    from ..planning.types import Plan

    from ..errors import PlanError, PlanFileError
    from ..planning.types import MAX_PLAN_CHARS

    data = input_file(plan_file, "plan file", PlanFileError, max_bytes=MAX_PLAN_CHARS).read_bytes()
    plan = Plan.from_json(data, source=str(plan_file))
    try:  # checked against the model's convs (names, kinds, ranks ≤ kh·kw) before anything is built
        rewritten = apply_plan(model, plan, inplace=False, init="random")
    except PlanError as exc:
        if str(exc).startswith(str(plan_file)):
            raise
        raise PlanFileError(f"{plan_file}: {exc}") from None
    note = fit_state_dict(rewritten, sd, source=str(path), arch=f"{arch} + plan {plan_file.name}")
    return rewritten, ", ".join(x for x in (f"rewritten per {plan_file.name}", note) if x)


def load_model(
    spec: Union[str, os.PathLike],
    *,
    arch: Optional[str] = None,
    arch_args: Optional[Mapping[str, Any]] = None,
    trust_pickle: bool = False,
    map_location: Any = "cpu",
    allow_modules: Iterable[str] = (),
    allow_globals: Iterable[str] = (),
    state_dict_key: Optional[str] = None,
) -> LoadedModel:
    """Load a model from a file, an arch spec or ``"demo"`` (see the module docstring).

    ``allow_modules``/``allow_globals`` extend the safe loader's allowlist (CLI
    ``--allow-module``/``--allow-global``); ``state_dict_key`` picks the checkpoint entry
    (CLI ``--state-dict-key``). A state dict next to a ``.plan.json`` sidecar (a rewrite saved
    with ``--save-format safetensors``) is loaded into ``arch`` rewritten by that plan.

    Example:
        >>> load_model("demo").source
        'trained demo U-Net (shapes, 4 classes; dsrewrite.shapes)'
        >>> load_model("resnet18")
        Traceback (most recent call last):
        ...
        dsrewrite.errors.ModelLoadError: 'resnet18' is neither a file nor a model spec: pass a file written by torch.save, 'demo', or an arch spec such as 'timm:resnet18', 'torchvision:resnet18', 'smp:Unet:resnet18' or 'mypkg.models:build_model'.
    """
    text = os.fspath(spec)
    path = Path(text)
    if not isinstance(spec, os.PathLike) and not path_exists(path):
        if text in DEMO_MODELS:
            from ..demo import demo_defaults

            a = arch_spec(text, arch_args)
            metric, shape = demo_defaults(text)
            return LoadedModel(build_arch(a), DEMO_MODELS[text], "demo", text, arch=a, task_metric=metric,
                               input_shape=shape)
        if _looks_like_arch(text):
            a = arch_spec(text, arch_args)
            return LoadedModel(build_arch(a), f"{a} (random weights)", "arch", text, arch=a)
        if path.suffix not in _FILE_SUFFIXES and os.sep not in text and "/" not in text:
            raise ModelLoadError(
                f"{text!r} is neither a file nor a model spec: pass a file written by torch.save, 'demo', "
                f"or an arch spec such as {ARCH_EXAMPLES}."
            )
    if arch is None and arch_args:
        raise ModelLoadError(
            f"arch args ({', '.join(arch_args)}) need an arch spec: pass --arch (arch=... in Python) with them."
        )
    spec_arch = arch_spec(arch, arch_args) if arch is not None else None
    obj, how = read_torch_file(path, trust_pickle=trust_pickle, map_location=map_location,
                               allow_modules=allow_modules, allow_globals=allow_globals)
    if isinstance(obj, Mapping) and not is_tensor_mapping(obj):
        if state_dict_key is not None and isinstance(obj.get(state_dict_key), nn.Module):
            obj, how = obj[state_dict_key], f"{how}, key {state_dict_key!r} (a whole module)"
        elif state_dict_key is None and not (spec_arch is not None and _holds_state_dict(obj)):
            # a whole module in the checkpoint, unless --arch asks for the state dict it also holds
            for key in ("model", "module", "net"):
                if isinstance(obj.get(key), nn.Module):
                    obj, how = obj[key], f"{how}, key {key!r} (a whole module)"
                    break
    if isinstance(obj, nn.Module):
        model, notes = unwrap_parallel(_check_rebuilt(obj, path))
        desc = f"{path}: full module {type(model).__name__} ({', '.join([how, *notes])})"
        if arch is not None:
            desc += f"; --arch {spec_arch} ignored (the file holds the whole model)"
        return LoadedModel(model, desc, "module", text, path)
    sd, where = extract_state_dict(obj, source=str(path), state_dict_key=state_dict_key)
    if spec_arch is None:
        raise ModelLoadError(
            f"{path} holds a state dict ({len(sd)} tensors, e.g. {next(iter(sd))!r}), not a whole model: "
            f"pass --arch (arch=... in Python) to say which architecture to load it into, e.g. {ARCH_FLAG_EXAMPLES}."
        )
    on_meta = fit_on_meta(spec_arch, sd, source=str(path))  # no second copy of the weights, where safe
    if on_meta is not None:
        model, fitted = on_meta
    else:
        model = build_arch(spec_arch)
        try:
            fitted = fit_state_dict(model, sd, source=str(path), arch=str(spec_arch))
        except ModelLoadError:
            model, fitted = _fit_rewritten(model, sd, path, str(spec_arch))
    detail = ", ".join(x for x in (how, where, fitted) if x)
    return LoadedModel(model, f"{path}: state dict ({len(sd)} tensors; {detail}) into {spec_arch}", "state_dict",
                       text, path, arch=spec_arch)
