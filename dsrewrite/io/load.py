"""Load a model from a file (full-module pickle or checkpoint) or from an architecture spec.

``load_model(spec)`` accepts:

* ``"demo"``: the embedded demo U-Net (:func:`dsrewrite.demo.demo_unet`);
* an **arch spec**, random weights, never a download: ``timm:resnet18``,
  ``torchvision:resnet18``, ``smp:Unet:resnet18`` (segmentation_models_pytorch
  ``arch[:encoder]``, ``encoder_weights=None``) or ``package.module:factory``,
  with keyword arguments ``arch_args`` (see :mod:`dsrewrite.io.arch`);
* a **file** written by ``torch.save``:

  - a full module (``torch.save(model)``), read by the restricted unpickler of
    :mod:`dsrewrite.io.safe_pickle` (``trust_pickle=True``: plain ``torch.load``);
  - a checkpoint: a state dict, or a dict holding one under ``"state_dict"``,
    ``"model"`` or ``"model_state_dict"``, read with ``weights_only=True`` and
    loaded into ``arch`` (a ``module.`` prefix from DataParallel/DDP is stripped);
  - a ``.safetensors`` file (a state dict; needs ``arch``).

``nn.DataParallel``/``DistributedDataParallel`` wrappers are unwrapped. Every
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
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

import torch
from torch import nn

from ..errors import ModelLoadError, UnsafePickleError
from .arch import ARCH_EXAMPLES, ARCH_FLAG_EXAMPLES, ArchSpec, arch_spec, build_arch
from .safe_pickle import restricted_torch_load

__all__ = [
    "LoadedModel",
    "load_model",
    "build_arch",
    "read_torch_file",
    "extract_state_dict",
    "load_state_dict_checked",
    "unwrap_parallel",
    "ARCH_EXAMPLES",
    "STATE_DICT_KEYS",
]

Kind = Literal["module", "state_dict", "arch", "demo"]

#: Keys under which a checkpoint dict may hold the state dict (searched in this order).
STATE_DICT_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model")
_FILE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".safetensors"}


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model and where it came from.

    ``source`` describes it for humans (file, format, unwrapping, arch);
    ``kind`` is ``"module"`` (full-module pickle), ``"state_dict"`` (checkpoint
    loaded into an arch), ``"arch"`` (random weights from an arch spec) or
    ``"demo"``; ``source_spec`` is the spec as given; ``path`` is the file, if any.
    ``arch`` is the architecture it was built from (kinds ``"arch"``, ``"state_dict"``,
    ``"demo"``; None for a full module), which a saved plan records.
    """

    model: nn.Module
    source: str
    kind: Kind
    source_spec: str = ""
    path: Optional[Path] = None
    arch: Optional[ArchSpec] = None


def unwrap_parallel(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Strip ``nn.DataParallel``/``DistributedDataParallel`` wrappers; return the model and what was stripped.

    Example:
        >>> m, notes = unwrap_parallel(nn.DataParallel(nn.Linear(2, 2)))
        >>> type(m).__name__, notes
        ('Linear', ['unwrapped nn.DataParallel'])
    """
    notes = []
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        notes.append(f"unwrapped nn.{type(model).__name__}")
        model = model.module
    return model, notes


# ----------------------------------------------------------------------------- arch specs


def _looks_like_arch(spec: str) -> bool:
    return ":" in spec and not any(sep in spec for sep in ("/", "\\")) and Path(spec).suffix not in _FILE_SUFFIXES



# ----------------------------------------------------------------------------- files


def _check_file(path: Path) -> str:
    """Return the format ('zip', 'legacy', 'safetensors') or raise a ModelLoadError."""
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}. Check the path, or pass an arch spec ({ARCH_EXAMPLES}) or 'demo'.")
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
                    map_location: Any = "cpu") -> tuple[Any, str]:
    """Read a ``torch.save`` file; return the object and how it was read.

    Tries ``weights_only=True`` first (checkpoints); a pickle that needs more is
    read by the restricted unpickler (or plain ``torch.load`` if ``trust_pickle``).

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
        try:
            return torch.load(path, map_location=map_location, weights_only=False), "trusted pickle"
        except Exception as exc:
            raise _corrupt(path, exc) from exc
    try:
        return torch.load(path, map_location=map_location, weights_only=True), "weights_only"
    except pickle.UnpicklingError:
        pass  # needs more than weights: try the restricted unpickler below
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    try:
        return restricted_torch_load(path, map_location=map_location), "restricted unpickler"
    except ModelLoadError:  # UnsafePickleError included
        raise
    except Exception as exc:
        raise _corrupt(path, exc) from exc


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(obj: Any, *, source: str = "<object>") -> tuple[dict[str, torch.Tensor], str]:
    """Find the state dict in a checkpoint object; strip a ``module.`` prefix; say where it was.

    Example:
        >>> sd, where = extract_state_dict({"state_dict": {"module.w": torch.ones(1)}})
        >>> list(sd), where
        (['w'], "key 'state_dict', stripped 'module.' prefix")
    """
    notes: list[str] = []
    if _is_tensor_mapping(obj):
        sd = dict(obj)
    else:
        found = None
        if isinstance(obj, Mapping):
            for key in STATE_DICT_KEYS:
                if _is_tensor_mapping(obj.get(key)):
                    found = key
                    break
        if found is None:
            what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
            raise ModelLoadError(
                f"{source} holds {what}, not a model or a state dict: expected torch.save(model), a dict of "
                f"tensors, or a checkpoint with one under {', '.join(map(repr, STATE_DICT_KEYS))}."
            )
        sd = dict(obj[found])
        notes.append(f"key {found!r}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
        notes.append("stripped 'module.' prefix")
    return sd, ", ".join(notes)


def _few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", … (+{len(keys) - n})" if len(keys) > n else "")


def load_state_dict_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], *, source: str, arch: str) -> None:
    """``model.load_state_dict(sd, strict=True)`` with a clear error naming keys and shapes.

    Example:
        >>> load_state_dict_checked(nn.Linear(2, 3), {"weight": torch.ones(3, 3)}, source="x.pt", arch="lin")
        Traceback (most recent call last):
        ...
        dsrewrite.errors.ModelLoadError: state dict in x.pt does not fit arch 'lin': 1 missing (bias), 1 shape mismatch (weight: file [3, 3] vs model [3, 2]). Check that --arch names the architecture (and head size) the checkpoint was saved from.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        if mismatched:
            shown = [f"{k}: file {list(sd[k].shape)} vs model {list(own[k].shape)}" for k in mismatched]
            parts.append(f"{len(mismatched)} shape mismatch{'es' if len(mismatched) > 1 else ''} ({_few(shown, 3)})")
        raise ModelLoadError(
            f"state dict in {source} does not fit arch {arch!r}: {', '.join(parts)}. Check that --arch names "
            "the architecture (and head size) the checkpoint was saved from."
        )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"state dict in {source} does not load into arch {arch!r}: {exc}") from exc


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


def load_model(
    spec: Union[str, os.PathLike],
    *,
    arch: Optional[str] = None,
    arch_args: Optional[Mapping[str, Any]] = None,
    trust_pickle: bool = False,
    map_location: Any = "cpu",
) -> LoadedModel:
    """Load a model from a file, an arch spec or ``"demo"`` (see the module docstring).

    Example:
        >>> load_model("demo").source
        'demo U-Net (ResNet18 encoder, random weights, seed 0)'
        >>> load_model("resnet18")
        Traceback (most recent call last):
        ...
        dsrewrite.errors.ModelLoadError: 'resnet18' is neither a file nor a model spec: pass a file written by torch.save, 'demo', or an arch spec such as 'timm:resnet18', 'torchvision:resnet18', 'smp:Unet:resnet18' or 'mypkg.models:build_model'.
    """
    text = os.fspath(spec)
    path = Path(text)
    if not isinstance(spec, os.PathLike) and not path.exists():
        if text == "demo":
            from ..demo import demo_unet

            return LoadedModel(demo_unet(), "demo U-Net (ResNet18 encoder, random weights, seed 0)", "demo", text,
                               arch=arch_spec(text, arch_args))
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
    obj, how = read_torch_file(path, trust_pickle=trust_pickle, map_location=map_location)
    if isinstance(obj, Mapping) and not _is_tensor_mapping(obj):
        for key in ("model", "module", "net"):
            if isinstance(obj.get(key), nn.Module):
                obj, how = obj[key], f"{how}, key {key!r}"
                break
    if isinstance(obj, nn.Module):
        model, notes = unwrap_parallel(_check_rebuilt(obj, path))
        desc = f"{path}: full module {type(model).__name__} ({', '.join([how, *notes])})"
        if arch is not None:
            desc += f"; --arch {spec_arch} ignored (the file holds the whole model)"
        return LoadedModel(model, desc, "module", text, path)
    sd, where = extract_state_dict(obj, source=str(path))
    if spec_arch is None:
        raise ModelLoadError(
            f"{path} holds a state dict ({len(sd)} tensors, e.g. {next(iter(sd))!r}), not a whole model: "
            f"pass --arch (arch=... in Python) to say which architecture to load it into, e.g. {ARCH_FLAG_EXAMPLES}."
        )
    model = build_arch(spec_arch)
    load_state_dict_checked(model, sd, source=str(path), arch=str(spec_arch))
    detail = ", ".join(x for x in (how, where) if x)
    return LoadedModel(model, f"{path}: state dict ({len(sd)} tensors; {detail}) into {spec_arch}", "state_dict",
                       text, path, arch=spec_arch)
