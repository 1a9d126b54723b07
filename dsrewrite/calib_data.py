"""Unlabeled calibration data for the CLI: a folder of images or a saved tensor file.

Images are decoded with torchvision, converted to RGB float in [0, 1], resized
(bilinear, antialiased) and normalised by a preset or an explicit mean/std.
A tensor file (``torch.save`` of an ``(N, C, H, W)`` tensor or a list of them) is
read with ``weights_only=True``.

Example:
    >>> import torch, tempfile, os
    >>> d = tempfile.mkdtemp(); f = os.path.join(d, "x.pt")
    >>> torch.save(torch.randn(10, 3, 8, 8), f)
    >>> [b.shape[0] for b in load_calibration(f, input_shape=(1, 3, 8, 8), batch_size=4)]
    [4, 4, 2]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .errors import UsageError

__all__ = ["load_calibration", "PRESETS", "IMAGE_SUFFIXES"]

PRESETS: dict[str, Optional[tuple[tuple[float, ...], tuple[float, ...]]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": None,
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _floats(text: Optional[str], what: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"--calib-{what} {text!r} is not a comma-separated list of numbers, e.g. 0.5,0.5,0.5")


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
        return parts[0], parts[1]
    h, w = text
    return int(h), int(w)


def _batches(x: Tensor, batch_size: int) -> list[Tensor]:
    return [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]


def load_calibration(
    path: Union[str, os.PathLike[str]],
    *,
    input_shape: Sequence[int] = (1, 3, 224, 224),
    size: Union[str, Sequence[int], None] = None,
    preset: str = "imagenet",
    mean: Optional[str] = None,
    std: Optional[str] = None,
    limit: int = 64,
    batch_size: int = 8,
) -> list[Tensor]:
    """Read calibration batches from an image folder or a tensor file.

    Raises:
        UsageError: the path is missing or empty, holds no readable images, or the
            tensor file is not an (N, C, H, W) tensor (or list of them).
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"calibration data {str(p)!r} does not exist. Hint: pass a folder of images or a .pt tensor file.")
    if p.is_file():
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UsageError(f"calibration file {str(p)!r} is not a torch tensor file ({type(exc).__name__}).") from exc
        if isinstance(obj, Tensor):
            obj = [obj]
        if not isinstance(obj, (list, tuple)) or not all(isinstance(t, Tensor) and t.dim() == 4 for t in obj):
            raise UsageError(
                f"calibration file {str(p)!r} must hold an (N, C, H, W) tensor or a list of them. "
                "Hint: torch.save(torch.stack(images), 'calib.pt')."
            )
        x = torch.cat([t.float() for t in obj])[:limit]
        return _batches(x, batch_size)
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise UsageError(f"calibration folder {str(p)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as TF

    h, w = _size(size, input_shape)
    if preset not in PRESETS:
        raise UsageError(f"--calib-preset {preset!r} is not one of {sorted(PRESETS)}")
    norm = PRESETS[preset]
    m, s = _floats(mean, "mean"), _floats(std, "std")
    if m is not None or s is not None:
        norm = (m or (0.0,) * 3, s or (1.0,) * 3)
    images = []
    for f in files:
        try:
            img = decode_image(str(f), mode=ImageReadMode.RGB)
        except Exception as exc:
            raise UsageError(f"calibration image {str(f)!r} cannot be decoded ({type(exc).__name__}).") from exc
        img = TF.resize(img.float() / 255.0, [h, w], antialias=True)
        if norm is not None:
            img = TF.normalize(img, list(norm[0]), list(norm[1]))
        images.append(img)
    return _batches(torch.stack(images), batch_size)
