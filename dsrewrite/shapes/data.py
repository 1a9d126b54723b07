# SPDX-License-Identifier: Apache-2.0
"""Synthetic segmentation data for the demo and the benchmarks: shapes on noisy backgrounds.

Each image has a random background (colour, linear gradient, Gaussian noise) and
1–4 filled shapes of random colour and size; the label of a pixel is the class of
the topmost shape covering it. Classes: 0 background, 1 circle, 2 square
(axis-aligned), 3 triangle (random orientation). Colour says nothing about the
class, so a model must use shape. Everything is generated from a seed (torch
only, no files, no download).

Example:
    >>> x, y = make_shapes(4, size=32, seed=0)
    >>> x.shape, y.shape, y.dtype, int(y.max()) <= 3
    (torch.Size([4, 3, 32, 32]), torch.Size([4, 32, 32]), torch.int64, True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["make_shapes", "CLASSES", "NUM_CLASSES", "miou", "confusion"]

CLASSES: tuple[str, ...] = ("background", "circle", "square", "triangle")
NUM_CLASSES = len(CLASSES)


def _triangle_mask(yy: Tensor, xx: Tensor, cy: float, cx: float, r: float, angle: float) -> Tensor:
    pts = [(cy + r * math.sin(angle + t), cx + r * math.cos(angle + t)) for t in (0.0, 2.094395, 4.188790)]
    inside = torch.ones_like(yy, dtype=torch.bool)
    sign = None
    for (y0, x0), (y1, x1) in zip(pts, pts[1:] + pts[:1]):
        cross = (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)
        s = cross >= 0
        if sign is None:
            sign = s
        else:
            inside &= s == sign
    return inside


def make_shapes(n: int, *, size: int = 64, seed: int = 0, noise: float = 0.12) -> tuple[Tensor, Tensor]:
    """``n`` images ``(n, 3, size, size)`` float32 (roughly zero-mean) and labels ``(n, size, size)`` int64.

    Example:
        >>> torch.equal(make_shapes(2, size=16, seed=1)[0], make_shapes(2, size=16, seed=1)[0])
        True
    """
    g = torch.Generator().manual_seed(seed)

    def u(lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images = torch.empty(n, 3, size, size)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        base = torch.rand(3, 1, 1, generator=g)
        gy, gx = u(-0.3, 0.3), u(-0.3, 0.3)
        img = base + (gy * yy + gx * xx)[None] / size
        lab = torch.zeros(size, size, dtype=torch.long)
        for _ in range(int(torch.randint(1, 5, (), generator=g))):
            cls = int(torch.randint(1, NUM_CLASSES, (), generator=g))
            r = u(0.08, 0.2) * size
            cy, cx = u(r, size - r), u(r, size - r)
            if cls == 1:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            elif cls == 2:
                h = r * 0.85
                mask = ((yy - cy).abs() <= h) & ((xx - cx).abs() <= h)
            else:
                mask = _triangle_mask(yy, xx, cy, cx, r * 1.2, u(0, 2 * math.pi))
            colour = torch.rand(3, 1, 1, generator=g)
            img = torch.where(mask[None], colour.expand(3, size, size), img)
            lab[mask] = cls
        img = img + noise * torch.randn(3, size, size, generator=g)
        images[i] = (img - 0.5) / 0.3
        labels[i] = lab
    return images, labels


def confusion(pred: Tensor, target: Tensor, num_classes: int = NUM_CLASSES) -> Tensor:
    """``(C, C)`` confusion counts, rows = target, columns = prediction.

    Example:
        >>> confusion(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2).tolist()
        [[1, 1], [0, 1]]
    """
    idx = target.reshape(-1) * num_classes + pred.reshape(-1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou(conf: Tensor) -> float:
    """Mean intersection-over-union over the classes present (target or prediction), in [0, 1].

    Example:
        >>> miou(torch.tensor([[1, 1], [0, 1]]))
        0.5
    """
    conf = conf.to(torch.float64)
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if bool(present.any()) else 1.0
