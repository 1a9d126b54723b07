# SPDX-License-Identifier: Apache-2.0
"""Learning-rate schedules for healing, as ``torch.optim.lr_scheduler.LambdaLR`` factors.

``factor(step)`` multiplies the base learning rate at (1-based) optimizer step ``step`` of
``steps``: ``constant`` 1; ``cosine`` ``½(1 + cos(π (step−1)/steps))``; ``linear``
``1 − (step−1)/steps``; each times ``step/warmup`` during the first ``warmup`` steps. The
factor depends only on the global step and ``steps``, so a resumed run (same ``steps``)
continues the same curve; the scheduler's state goes into the heal checkpoint.

Example:
    >>> [round(factor(s, 4, "cosine", 2), 3) for s in (1, 2, 3, 4)]
    [0.5, 0.854, 0.5, 0.146]
    >>> import torch
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> sched = make_scheduler(opt, steps=4, schedule="linear", warmup=0)
    >>> lrs = []
    >>> for _ in range(4):
    ...     lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
    >>> lrs
    [1.0, 0.75, 0.5, 0.25]
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .choices import SCHEDULES

if TYPE_CHECKING:  # torch is imported where a scheduler is made: the names above stay light
    import torch

__all__ = ["SCHEDULES", "factor", "make_scheduler"]

def factor(step: int, steps: int, schedule: str, warmup: int) -> float:
    """The learning-rate multiplier of 1-based ``step`` (see the module docstring)."""
    f = 1.0
    if schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * (step - 1) / max(steps, 1)))
    elif schedule == "linear":
        f = 1.0 - (step - 1) / max(steps, 1)
    if warmup and step <= warmup:
        f *= step / warmup
    return f


def make_scheduler(optimizer: torch.optim.Optimizer, *, steps: int, schedule: str, warmup: int
                   ) -> "torch.optim.lr_scheduler.LambdaLR":
    """A ``LambdaLR`` that sets the rate of step ``s`` before the ``s``-th ``optimizer.step()``
    (call ``scheduler.step()`` after each)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: factor(e + 1, steps, schedule, warmup))
