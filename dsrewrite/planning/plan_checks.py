# SPDX-License-Identifier: Apache-2.0
"""Checks of a plan against the model, before anything is built: ranks that fit each kernel, finite weights.

A depth multiplier ``m`` above ``kh·kw`` adds nothing (the kernel's rank along its spatial
taps is at most ``kh·kw``) and makes the "light" block heavier than the dense conv; a tampered
plan with ``m = 100000`` would allocate hundreds of MB before failing. Non-finite weights make
the SVD fail without saying why, or pass and write NaN. Both are refused here, naming the conv.

Example:
    >>> from torch import nn
    >>> check_rank("enc.0", nn.Conv2d(4, 4, 3), 10)
    Traceback (most recent call last):
    ...
    dsrewrite.errors.PlanFileError: conv 'enc.0' (3×3): depth multiplier 10 is more than kh·kw = 9, the most a 3×3 kernel can use (a larger m makes the block heavier and adds nothing); use m ≤ 9.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from ..errors import PlanFileError, UnsupportedModelError, UsageError
from ..runtime.conv_weight import raw_weight

__all__ = ["check_rank", "check_finite_weights"]


def check_rank(name: str, conv: nn.Module, m: object, error: type[UsageError] = PlanFileError,
               source: str = "") -> None:
    """Refuse a depth multiplier that is not an int in ``[1, kh·kw]`` of ``conv``.

    Raises:
        UsageError: (``error``; :class:`~dsrewrite.errors.PlanFileError` by default) naming the conv.
    """
    where = f"{source}: " if source else ""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise error(f"{where}conv {name!r}: depth multiplier {m!r} is not an integer ≥ 1.")
    kernel = getattr(conv, "kernel_size", None)
    if not isinstance(kernel, tuple) or not kernel:
        return
    taps = math.prod(int(k) for k in kernel)
    if m > taps:
        shown = str(m) if len(str(m)) <= 24 else f"{str(m)[:12]}… ({len(str(m))} digits)"
        size = "×".join(str(k) for k in kernel)
        raise error(f"{where}conv {name!r} ({size}): depth multiplier {shown} is more than kh·kw = {taps}, the most "
                    f"a {size} kernel can use (a larger m makes the block heavier and adds nothing); use m ≤ {taps}.")


def check_finite_weights(model: nn.Module, names: Iterable[str]) -> None:
    """Refuse NaN or ±inf in the weight or bias of each named conv (meta tensors are skipped).

    Raises:
        UnsupportedModelError: naming the conv, the tensor and how many values are not finite.
    """
    for name in dict.fromkeys(names):
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            continue  # the caller reports unknown names
        for attr in ("weight", "bias"):
            t = raw_weight(conv) if attr == "weight" else getattr(conv, attr, None)  # parametrized: nothing computed
            if not isinstance(t, torch.Tensor) or t.device.type == "meta" or not t.is_floating_point():
                continue
            finite = torch.isfinite(t.detach())
            if not bool(finite.all()):
                bad = t.detach()[~finite]
                kinds = [k for k, hit in (("NaN", bool(torch.isnan(bad).any())), ("inf", bool(torch.isinf(bad).any())))
                         if hit]
                raise UnsupportedModelError(
                    f"conv {name!r}: its {attr} holds {' and '.join(kinds)} ({int((~finite).sum())} of {t.numel()} "
                    "values); a factorisation of non-finite weights is meaningless. Fix or retrain the model "
                    "(or exclude the conv in the recipe).")
