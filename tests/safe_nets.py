"""Small models for the safe-replacement tests: importable, so full-module files of them load back."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


class Three(nn.Module):
    """Three 3×3 convs, 16 channels; ``norm`` puts a weight norm on ``b`` and/or ``c``.

    ``norm``: ``None``, ``"spectral"`` / ``"weight"`` (new-style parametrizations), ``"old_spectral"`` /
    ``"old_weight"`` (hook-based). ``on``: which convs carry it.
    """

    def __init__(self, norm: Optional[str] = None, on: tuple[str, ...] = ("b",), seed: int = 0) -> None:
        super().__init__()
        _seeded(seed)
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        wrap = {
            None: lambda m: m,
            "spectral": nn.utils.parametrizations.spectral_norm,
            "weight": nn.utils.parametrizations.weight_norm,
            "old_spectral": nn.utils.spectral_norm,
            "old_weight": nn.utils.weight_norm,
        }[norm]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the hook-based norms
            for name in on:
                setattr(self, name, wrap(getattr(self, name)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


def spectral_on_c() -> Three:
    """A factory for ``--arch``: spectral norm (new style) on ``c``."""
    return Three("spectral", on=("c",))


class KernelReuse(nn.Module):
    """``F.conv2d(x, self.b.weight, dilation=2)`` (kernel reuse) and ``x.to(self.c.weight.dtype)`` (dtype read)."""

    def __init__(self) -> None:
        super().__init__()
        _seeded(0)
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.d = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(x))
        y = self.b(y) + F.conv2d(y, self.b.weight, padding=2, dilation=2)
        y = self.c(y.to(self.c.weight.dtype))
        return self.d(y)


class WithLazy(nn.Module):
    """A lazy conv that the forward reaches (``reach=True``) or not."""

    def __init__(self, reach: bool) -> None:
        super().__init__()
        _seeded(0)
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.lazy = nn.LazyConv2d(16, 3, padding=1)
        self.reach = reach

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.lazy(y) if self.reach else y
