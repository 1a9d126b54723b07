# SPDX-License-Identifier: Apache-2.0
"""Final predictors: the convs whose output reaches a model output through no further conv or linear layer.

A final predictor (a segmentation head's classifier, a detector's ``cls_logits`` and
``bbox_reg``) produces the numbers the task reads; separating it saves little and costs
the most accuracy, so ``decoder_only`` keeps it dense whatever its channel count.

It is read off the eager run's autograd graph, which every model has, even those no
graph capture can trace (detectors with data-dependent post-processing): the example
forward runs with gradients enabled on a copy of the input that requires grad, each conv
module's output records its ``grad_fn``, and a walk back from every output tensor stops
at the first convolution or matrix product it meets; the conv modules met first are the
final predictors. Outputs that do not depend differentiably on a conv (indices, labels,
detached proposals) make no conv final.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1), nn.Upsample(scale_factor=2.0))
    >>> rec = ConvOutputs()
    >>> with torch.enable_grad():
    ...     out = rec.run(net, (torch.randn(1, 3, 8, 8),))
    >>> rec.final(out) == {id(net[2])}
    True
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .verify import flatten_outputs

__all__ = ["ConvOutputs", "STOP_NODES"]

#: autograd node names of the ops that mix channels like a conv or a linear layer (the walk stops there).
STOP_NODES = ("Convolution", "Addmm", "Mm", "Bmm", "Linear", "Baddbmm", "Addbmm", "Addmv", "Mv", "Matmul",
              "Einsum", "Bilinear")


def _stops(fn: Any) -> bool:
    name = type(fn).__name__
    return any(name.startswith(s) or name.startswith(f"Mkldnn{s}") for s in STOP_NODES)


class ConvOutputs:
    """Records the ``grad_fn`` of every conv module's output while a model runs (see the module docstring)."""

    def __init__(self) -> None:
        self.owner: dict[Any, int] = {}
        self.saw_grad = False

    def hook(self, mod: nn.Module, _args: Any, out: Any) -> None:
        """A forward hook for conv modules."""
        if isinstance(out, Tensor) and out.grad_fn is not None:
            self.owner[out.grad_fn] = id(mod)
            self.saw_grad = True

    def run(self, model: nn.Module, args: tuple[Any, ...]) -> Any:
        """Run ``model(*args)`` with the hook on every conv module (inputs made to require grad)."""
        handles = [m.register_forward_hook(self.hook) for m in model.modules() if isinstance(m, _ConvNd)]
        try:
            return model(*grad_inputs(args))
        finally:
            for h in handles:
                h.remove()

    def final(self, outputs: Any) -> Optional[set[int]]:
        """Ids of the conv modules that are final predictors of ``outputs``; None when no conv output had a grad_fn."""
        if not self.saw_grad:
            return None
        found: set[int] = set()
        seen: set[Any] = set()
        stack = [t.grad_fn for _, t in flatten_outputs(outputs) if isinstance(t, Tensor) and t.grad_fn is not None]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            if fn in self.owner:
                found.add(self.owner[fn])
                continue
            if _stops(fn):
                continue
            stack.extend(nxt for nxt, _ in fn.next_functions)
        return found


def grad_inputs(args: Iterable[Any]) -> tuple[Any, ...]:
    """The args with each floating tensor replaced by a copy that requires grad (a non-leaf, so in-place ops work)."""
    out = []
    for a in args:
        if isinstance(a, Tensor) and a.is_floating_point():
            a = a.detach().clone().requires_grad_(True).clone()
        out.append(a)
    return tuple(out)
