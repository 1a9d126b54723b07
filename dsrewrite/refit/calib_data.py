# SPDX-License-Identifier: Apache-2.0
"""Data files for the CLI: calibration/healing batches and example inputs, read lazily.

``open_calibration(path, ...)`` reads

* one image, or a folder (searched recursively, in sorted path order) of images (``.png .jpg .jpeg .bmp .tif
  .tiff .webp``, decoded with Pillow) and ``.npy`` arrays (one sample each, ``(C, H, W)`` or
  ``(H, W)``). Images are converted to the model's channel count (1: grayscale ``L``, 16-bit
  grayscale kept at full range; 3: ``RGB``; 4: ``RGBA``), scaled to [0, 1], resized (bilinear,
  antialiased) to ``size`` and normalised by a preset or an explicit mean/std; arrays are used as
  they are (float, resized when their size differs, not normalised).
* a tensor file: ``.pt`` (``torch.save`` of an ``(N, C, H, W)`` tensor, a list of such batches, or,
  for a multi-input model, a list of batches each a tuple or dict), ``.npy`` (one ``(N, C, H, W)``
  array) or ``.npz`` (several, used in order). Read with ``weights_only=True`` /
  ``allow_pickle=False`` and memory-mapped where the format allows.

Everything is decoded batch by batch through a ``torch.utils.data.Dataset`` and ``DataLoader``:
only the first ``limit`` samples are ever decoded, and a consumer that streams (heal) holds one
batch at a time.

``example_inputs_for(model, ...)`` gives the example inputs: a seeded random tensor of
``input_shape``, or what ``--example-inputs FILE`` holds (a tensor, tuple or dict).

Example:
    >>> import torch, tempfile, os
    >>> d = tempfile.mkdtemp(); f = os.path.join(d, "x.pt")
    >>> torch.save(torch.randn(10, 3, 8, 8), f)
    >>> data = open_calibration(f, input_shape=(1, 3, 8, 8), batch_size=4, limit=9)
    >>> [tuple(b.shape) for b in data.loader], data.count, data.total
    ([(4, 3, 8, 8), (4, 3, 8, 8), (1, 3, 8, 8)], 9, 10)
"""

from __future__ import annotations

import inspect
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..errors import UsageError, did_you_mean
from ..runtime.input_files import check_alloc, input_file, is_missing, path_exists
from .batch_checks import check_batch
from .choices import PRESETS

__all__ = ["open_calibration", "CalibrationData", "ImageFolderDataset", "example_inputs_for", "PRESETS",
           "IMAGE_SUFFIXES", "ARRAY_SUFFIXES"]

#: The smallest --calib-std value (dividing by less turns [0, 1] pixels into values near float32's range).
MIN_STD = 1e-6

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
ARRAY_SUFFIXES = (".npy",)
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class CalibrationData:
    """Batches read from a file or folder: ``loader`` (re-iterable, lazy), ``count`` samples it
    yields (after ``limit``), ``total`` samples found, ``source`` the path, ``kind`` ``"images"`` or
    ``"tensors"``."""

    loader: Iterable[Any]
    count: int
    total: int
    source: str
    kind: str

    def describe(self) -> str:
        """One line for the CLI, e.g. ``'12 of 40 images from data/ (--calib-limit)'``."""
        part = f"{self.count}" if self.count == self.total else f"{self.count} of {self.total}"
        return f"{part} samples from {self.source}" + ("" if self.count == self.total else " (limit)")


def _floats(text: Optional[str], what: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        vals = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        vals = ()
    if not vals:
        raise UsageError(f"--calib-{what} {text!r} is not a comma-separated list of numbers, e.g. 0.5,0.5,0.5")
    lo, hi = (MIN_STD, 1e6) if what == "std" else (-1e6, 1e6)
    bad = [v for v in vals if not (lo <= v <= hi)]  # NaN fails both comparisons
    if bad:
        raise UsageError(f"--calib-{what} {text!r}: {bad[0]!r} is out of range; each value must be a finite number "
                         f"≥ {lo:g} and ≤ {hi:g}" + (" (a std of 0 divides by zero)." if bad[0] == 0 and what == "std" else "."))
    return vals


def _size(text: Union[str, Sequence[int], None], input_shape: Sequence[int]) -> tuple[int, int]:
    if text is None:
        return int(input_shape[-2]), int(input_shape[-1])
    if isinstance(text, str):
        try:
            parts = [int(t) for t in text.replace("x", ",").split(",") if t.strip()]
        except ValueError:
            parts = []
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or min(parts) <= 0:
            raise UsageError(f"--calib-size {text!r} must be H,W (or one number), e.g. 256,256")
        check_alloc((int(input_shape[1]) if len(input_shape) > 1 else 1, *parts), 4, "--calib-size (one image)")
        return parts[0], parts[1]
    h, w = text
    return int(h), int(w)


def _normalisation(channels: int, preset: Optional[str], mean: Optional[str], std: Optional[str]
                   ) -> Optional[tuple[tuple[float, ...], tuple[float, ...]]]:
    """(mean, std) with ``channels`` values each, or None; refuses a preset of another channel count."""
    m, s = _floats(mean, "mean"), _floats(std, "std")
    if m is not None or s is not None:
        for what, v in (("mean", m), ("std", s)):
            if v is not None and len(v) not in (1, channels):
                raise UsageError(f"--calib-{what} has {len(v)} values but the model takes {channels} channel(s). "
                                 f"Hint: give 1 or {channels} comma-separated values.")
        if s is not None and any(x <= 0 for x in s):
            raise UsageError(f"--calib-std {std!r} must be positive.")
        mm = m or (0.0,)
        ss = s or (1.0,)
        return (mm * channels if len(mm) == 1 else mm), (ss * channels if len(ss) == 1 else ss)
    if preset is None:
        preset = "imagenet" if channels == 3 else "none"
    if preset not in PRESETS:
        raise UsageError(f"--calib-preset {preset!r} is not one of {sorted(PRESETS)}{did_you_mean(preset, PRESETS)}")
    norm = PRESETS[preset]
    if norm is not None and len(norm[0]) != channels:
        raise UsageError(
            f"--calib-preset {preset} normalises {len(norm[0])} channels but the model takes {channels} "
            f"(--input-shape). Hint: --calib-preset none, or --calib-mean/--calib-std with {channels} value(s)."
        )
    return norm


def _read_image(path: Path, channels: int) -> Tensor:
    """One image file as a float ``(channels, H, W)`` tensor in [0, 1]."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as img:
            if channels == 1 and img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                arr = np.asarray(img, dtype=np.float32) / 65535.0  # 16-bit grayscale at full range
            elif channels == 1 and img.mode == "F":
                arr = np.asarray(img, dtype=np.float32)
            else:
                arr = np.asarray(img.convert(_MODES[channels]), dtype=np.float32) / 255.0
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the same bad input
        raise UsageError(f"calibration image {str(path)!r} cannot be decoded ({type(exc).__name__}: {exc}).") from exc
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


def _read_array(path: Path, channels: int) -> Tensor:
    """One ``.npy`` sample as a float ``(channels, H, W)`` tensor."""
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"calibration array {str(path)!r} cannot be read ({type(exc).__name__}: {exc}).") from exc
    t = torch.from_numpy(np.asarray(arr, dtype=np.float32))
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] != channels:
        raise UsageError(f"calibration array {str(path)!r} has shape {tuple(arr.shape)}; a sample in a folder must "
                         f"be (C, H, W) with C = {channels} (the model's channels) or (H, W) for C = 1.")
    return t


class ImageFolderDataset(Dataset):
    """Samples of an image/array folder, decoded on access: ``self[i]`` is a ``(C, H, W)`` float tensor.

    ``decoded`` counts the files decoded so far (one per ``__getitem__``).

    Example:
        >>> import tempfile, numpy as np
        >>> d = Path(tempfile.mkdtemp()); np.save(d / "a.npy", np.zeros((1, 4, 4), np.float32))
        >>> ds = ImageFolderDataset([d / "a.npy"], channels=1, size=(2, 2), norm=None)
        >>> tuple(ds[0].shape), ds.decoded
        ((1, 2, 2), 1)
    """

    def __init__(self, files: Sequence[Path], *, channels: int, size: tuple[int, int],
                 norm: Optional[tuple[tuple[float, ...], tuple[float, ...]]]) -> None:
        self.files = list(files)
        self.channels = channels
        self.size = size
        self.norm = norm
        self.decoded = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        f = self.files[i]
        self.decoded += 1
        is_array = f.suffix.lower() in ARRAY_SUFFIXES
        x = _read_array(f, self.channels) if is_array else _read_image(f, self.channels)
        if tuple(x.shape[-2:]) != self.size:
            x = TF.resize(x, list(self.size), antialias=True)
        if self.norm is not None and not is_array:
            x = TF.normalize(x, list(self.norm[0]), list(self.norm[1]))
        return x


class _Samples(Dataset):
    """Samples along dim 0 of tensors / memory-mapped arrays, in order, converted to float tensors."""

    def __init__(self, parts: Sequence[Any], count: int) -> None:
        self.parts = list(parts)
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Tensor:
        import numpy as np

        for p in self.parts:
            if i < len(p):
                x = p[i]
                return torch.as_tensor(np.array(x, dtype=np.float32)) if not isinstance(x, Tensor) else x.float()
            i -= len(p)
        raise IndexError(i)


def _image_folder(p: Path, channels: int, size: tuple[int, int], norm: Any, limit: Optional[int],
                  batch_size: int) -> CalibrationData:
    suffixes = IMAGE_SUFFIXES + ARRAY_SUFFIXES
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
    if not files:
        raise UsageError(f"calibration folder {str(p)!r} holds no images or arrays (searched recursively for "
                         f"{', '.join(suffixes)}). Hint: pass a folder of images or a .pt/.npy tensor file.")
    if channels not in _MODES and any(f.suffix.lower() in IMAGE_SUFFIXES for f in files):
        raise UsageError(
            f"images can be read for models with 1 (grayscale), 3 (RGB) or 4 (RGBA) input channels; "
            f"--input-shape gives {channels}. Hint: save the inputs as a .pt/.npy tensor file instead."
        )
    used = files[:limit] if limit is not None else files
    ds = ImageFolderDataset(used, channels=channels, size=size, norm=norm)
    return CalibrationData(DataLoader(ds, batch_size=batch_size), len(used), len(files), str(p), "images")


def _load_pt(p: Path) -> Any:
    try:
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not the zip format: mmap is unavailable
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # names something beyond tensors and containers: never run
        from ..io.safe_load import unpickler_reason

        raise UsageError(f"{str(p)!r} holds more than tensors, numbers and containers, and data files are read "
                         f"weights-only ({unpickler_reason(str(exc))}). Hint: torch.save only tensors, tuples, "
                         "lists and dicts of them.") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same bad input
        raise UsageError(f"{str(p)!r} is not a readable torch tensor file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}). Hint: write it with torch.save.") from exc


def _tensor_file(p: Path, input_shape: Optional[Sequence[int]], limit: Optional[int],
                 batch_size: int) -> CalibrationData:
    import numpy as np

    suffix = p.suffix.lower()
    if suffix == ".npy" or suffix == ".npz":
        try:
            obj = np.load(p, mmap_mode="r", allow_pickle=False) if suffix == ".npy" else np.load(p, allow_pickle=False)
            parts = [obj] if suffix == ".npy" else [obj[k] for k in obj.files]
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"calibration file {str(p)!r} cannot be read as {suffix} "
                             f"({type(exc).__name__}: {exc}).") from exc
    else:
        obj = _load_pt(p)
        if isinstance(obj, (list, tuple)) and obj and all(isinstance(b, (tuple, list, Mapping)) for b in obj):
            return _batch_list(p, list(obj), limit)  # multi-input batches
        parts = [obj] if isinstance(obj, Tensor) else obj
    if not isinstance(parts, (list, tuple)) or not parts or not all(
            hasattr(t, "shape") and len(t.shape) >= 2 for t in parts):
        raise UsageError(
            f"calibration file {str(p)!r} must hold an (N, C, H, W) tensor, a list of them, or (multi-input "
            "models) a list of batches each a tuple or dict. Hint: torch.save(torch.stack(images), 'calib.pt')."
        )
    for t in parts:
        dtype = str(getattr(t, "dtype", ""))
        if "complex" in dtype or dtype in ("bool", "torch.bool") or dtype.startswith(("<U", "|S", "object")):
            raise UsageError(f"calibration file {str(p)!r} holds a tensor of dtype {dtype}; calibration data are "
                             "real numbers (float, or integer pixels).")
        if input_shape is not None and (len(t.shape) != len(input_shape) or t.shape[1] != input_shape[1]):
            spatial = {3: ["L"], 4: ["H", "W"], 5: ["D", "H", "W"]}.get(len(input_shape), ["..."])
            want = ", ".join(["N", str(input_shape[1]), *spatial])
            raise UsageError(
                f"calibration file {str(p)!r} holds a tensor of shape {tuple(t.shape)}, but the model takes "
                f"({want}) (--input-shape). Hint: save inputs with the model's channel count."
            )
    total = sum(int(t.shape[0]) for t in parts)
    count = min(total, limit) if limit is not None else total
    return CalibrationData(DataLoader(_Samples(parts, count), batch_size=batch_size), count, total, str(p), "tensors")


def _batch_list(p: Path, batches: list[Any], limit: Optional[int]) -> CalibrationData:
    """A list of ready batches (tuples/dicts, for multi-input models): whole batches up to ``limit`` samples."""
    from .batches import batch_size_of

    sizes = [batch_size_of(b) for b in batches]
    used, n = [], 0
    for b, s in zip(batches, sizes):
        if limit is not None and n >= limit:
            break
        used.append(b)
        n += s
    return CalibrationData(used, n, sum(sizes), str(p), "tensors")


def open_calibration(
    path: PathLike,
    *,
    input_shape: Optional[Sequence[int]] = (1, 3, 224, 224),
    size: Union[str, Sequence[int], None] = None,
    preset: Optional[str] = None,
    mean: Optional[str] = None,
    std: Optional[str] = None,
    limit: Optional[int] = None,
    batch_size: int = 8,
) -> CalibrationData:
    """Open an image/array folder or a tensor file as lazily decoded batches (see the module docstring).

    Args:
        input_shape: ``(N, C, H, W)`` of the model's (single) input: ``C`` channels and the default
            ``H, W``; ``None`` for a multi-input model (then only a ``.pt`` of batches fits).
        size: ``"H,W"`` (or ``(H, W)``) to resize images to; default the input shape's.
        preset: ``"imagenet"`` (3 channels) or ``"none"``; default: imagenet for 3 channels, none
            otherwise. ``mean``/``std`` (comma-separated, 1 or C values) override it.
        limit: at most this many samples (None: all).
        batch_size: samples per batch.

    Raises:
        UsageError: missing path, empty folder, unreadable file, channel count that does not match,
            a preset for another channel count, bad mean/std/size.
    """
    _floats(mean, "mean"), _floats(std, "std")  # checked whatever the data holds (they apply to images)
    if input_shape is not None and len(input_shape) >= 2 and (mean is not None or std is not None):
        _normalisation(int(input_shape[1]), preset, mean, std)  # value counts against the channels
    p = Path(path)
    if str(path) == DEMO_DATA and not path_exists(p):
        return _demo_images(input_shape, size, limit, batch_size)
    if is_missing(p):
        raise UsageError(f"calibration data {str(p)!r} does not exist. Hint: pass a folder of images or a "
                         ".pt/.npy/.npz tensor file.")
    p = input_file(p, "calibration data", folder_ok=True)  # FIFOs, devices, names too long, unreadable
    if limit is not None and limit < 1:
        raise UsageError(f"calibration limit must be >= 1, got {limit}.")
    channels = int(input_shape[1]) if input_shape is not None and len(input_shape) >= 2 else None
    if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES:
        return _tensor_file(p, input_shape if channels is not None else None, limit, batch_size)
    if input_shape is None or channels is None:
        raise UsageError(
            f"calibration images {str(p)!r}: images feed a model with one (N, C, H, W) input; this model takes "
            "several (--example-inputs). Hint: torch.save a list of input tuples/dicts and pass that .pt file."
        )
    norm = _normalisation(channels, preset, mean, std)
    return _image_folder(p, channels, _size(size, input_shape), norm, limit, batch_size)


#: ``--calib demo``: the demo's generated shapes images (:func:`dsrewrite.shapes.calibration_images`).
DEMO_DATA = "demo"


def _demo_images(input_shape: Optional[Sequence[int]], size: Union[str, Sequence[int], None],
                 limit: Optional[int], batch_size: int) -> CalibrationData:
    """Generated, already normalised shapes images (unlabeled; a seed neither training nor evaluation uses)."""
    from ..shapes import calibration_images

    if input_shape is None or len(input_shape) != 4 or int(input_shape[1]) != 3:
        raise UsageError(f"--calib demo generates RGB images (N, 3, H, W); the model takes {input_shape}. "
                         "Hint: it is meant for `dsrewrite apply demo ...`.")
    h, w = _size(size, input_shape)
    if h != w:
        raise UsageError(f"--calib demo generates square images; got size {h}×{w}. Hint: --calib-size {h}.")
    n = limit or 64
    x = calibration_images(n, size=h)
    batches = [x[i : i + batch_size] for i in range(0, n, batch_size)]
    return CalibrationData(batches, n, n, f"demo (generated shapes, {h}×{w})", "images")


def _read_example(path: Path) -> Any:
    obj = _load_pt(path)

    def ok(o: Any) -> bool:
        if isinstance(o, Tensor) or isinstance(o, (int, float, bool)):
            return True
        if isinstance(o, (tuple, list)):
            return bool(o) and all(ok(x) for x in o)
        if isinstance(o, Mapping):
            return bool(o) and all(ok(x) for x in o.values())
        return False

    if not ok(obj) or not (isinstance(obj, (Tensor, tuple, list, Mapping))):
        raise UsageError(
            f"--example-inputs {str(path)!r} must hold a tensor, a tuple/list of positional inputs or a dict of "
            f"keyword inputs (tensors or numbers), got {type(obj).__name__}. "
            "Hint: torch.save((sample, timestep), 'inputs.pt')."
        )
    return tuple(obj) if isinstance(obj, list) else obj


def _as_positional(model: nn.Module, inputs: dict[str, Any], path: Path) -> tuple[Any, ...]:
    """A dict of keyword inputs as positional ones, in ``forward``'s parameter order (the graph capture needs them)."""
    try:
        params = [q for q in inspect.signature(model.forward).parameters.values()
                  if q.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [q.name for q in params]
    keys = list(inputs)
    if set(keys) != set(names[: len(keys)]) or any(q.default is inspect.Parameter.empty for q in params[len(keys):]):
        bad = next((k for k in keys if k not in names), keys[0])
        raise UsageError(
            f"--example-inputs {str(path)!r}: the dict keys {keys} must be the first parameters of the model's "
            f"forward {names}{did_you_mean(str(bad), names)}. Hint: save a tuple of positional inputs instead."
        )
    return tuple(inputs[n] for n in names[: len(keys)])


def example_inputs_for(
    model: nn.Module,
    *,
    input_shape: Optional[Sequence[int]] = None,
    path: Optional[PathLike] = None,
) -> tuple[Any, Optional[tuple[int, ...]]]:
    """``(example inputs, input shape)``: from ``path`` (``--example-inputs``) or a seeded random ``input_shape`` tensor.

    The input shape is the single input's shape, ``None`` for a multi-input model. Floating
    tensors from the file are cast to the model's floating dtype and moved to its device.

    Raises:
        UsageError: both or a bad file (not a tensor/tuple/dict, dict keys that are not ``forward``'s).

    Example:
        >>> x, shape = example_inputs_for(nn.Conv2d(3, 8, 3), input_shape=(1, 3, 8, 8))
        >>> tuple(x.shape), shape
        ((1, 3, 8, 8), (1, 3, 8, 8))
    """
    from ..runtime.preflight import device_dtype, example_input
    from .batches import to_device

    if path is None:
        shape = tuple(int(s) for s in (input_shape or (1, 3, 224, 224)))
        return example_input(model, shape), shape
    if input_shape is not None:
        raise UsageError("pass --input-shape or --example-inputs, not both (the file gives the shapes).")
    p = Path(path)
    if is_missing(p):
        raise UsageError(f"--example-inputs {str(p)!r} does not exist. Hint: torch.save((sample, timestep), FILE).")
    p = input_file(p, "--example-inputs")
    obj = _read_example(p)
    check_batch(obj, 0, f"--example-inputs {str(p)!r}", None)  # real, non-empty, finite
    if isinstance(obj, Mapping):
        obj = _as_positional(model, dict(obj), p)
    dev, dtype = device_dtype(model)

    def cast(o: Any) -> Any:
        if isinstance(o, Tensor):
            return o.to(dtype=dtype) if o.is_floating_point() else o
        if isinstance(o, tuple):
            return tuple(cast(x) for x in o)
        return o

    obj = to_device(cast(obj), dev)
    if isinstance(obj, Tensor):
        return obj, tuple(obj.shape)
    if len(obj) == 1 and isinstance(obj[0], Tensor):
        return obj[0], tuple(obj[0].shape)
    return obj, None
