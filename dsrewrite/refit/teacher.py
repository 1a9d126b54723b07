# SPDX-License-Identifier: Apache-2.0
"""The teacher's side of calibration: the original model's targets and outputs, and the output error.

:func:`teacher_pass` runs the original model once over the calibration batches and keeps,
per replaced layer, its conv's outputs at sampled positions (the least-squares targets of
:mod:`dsrewrite.refit.calibrate`); :class:`OutputError` compares the rewritten model's
outputs with the original's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CalibrationError
from ..runtime.run import call_model, flatten_outputs
from .layer_fit import LayerFit
from .patches_nd import sample_positions_nd, values_at

__all__ = ["OutputError", "teacher_pass"]


def teacher_pass(original: nn.Module, data: list[Any], layers: list[LayerFit], per_image: int, seed: int,
                 keep_outputs: bool) -> list[Any]:
    """Run ``original`` on every batch: each layer's targets at sampled positions, and the model's outputs.

    For every layer of ``layers`` and every batch, ``per_image`` output positions per image are
    sampled (seeded by ``seed``, the layer and the batch) and the original conv's outputs there
    are appended to ``layer.targets`` (``(P, C_out)``), the positions to ``layer.positions``
    (``(P, 1 + d)``); ``None`` where the conv was not called. A conv called more than once per
    forward marks its layer skipped. Returns the model's output tensors per batch when
    ``keep_outputs`` (else an empty list).
    """
    by_conv = {id(l.conv): l for l in layers}
    state = {"b": 0}
    handles = []

    def hook(module: nn.Module, args: Any, output: Tensor) -> None:
        layer = by_conv[id(module)]
        layer.calls_orig += 1
        if layer.calls_orig > 1:
            return
        n = output.shape[0]
        g = torch.Generator().manual_seed(seed * 1_000_003 + layer.index * 7919 + state["b"])
        pos = sample_positions_nd((n, *output.shape[2:]), per_image * n, generator=g)  # (P, 1 + d)
        layer.positions.append(pos)
        layer.targets.append(values_at(output, pos).detach().clone())

    for l in layers:
        handles.append(l.conv.register_forward_hook(hook))
    outputs = []
    try:
        for b, batch in enumerate(data):
            state["b"] = b
            for l in layers:
                l.calls_orig = 0
            out = call_model(original, batch)
            if keep_outputs:
                outputs.append([t.detach() for _, t in flatten_outputs(out)])
            for l in layers:
                if l.calls_orig == 0:
                    l.skip = l.skip or "the original conv was not called on the calibration batches"
                    l.positions.append(None)
                    l.targets.append(None)
                elif l.calls_orig > 1:
                    l.skip = l.skip or f"the original conv is called {l.calls_orig} times per forward (shared)"
    finally:
        for h in handles:
            h.remove()
    return outputs


class OutputError:
    """Relative L2 error of a model's output tensors against reference ones, accumulated over batches.

    Example:
        >>> e = OutputError(); e.add(torch.ones(2), [torch.full((2,), 2.0)]); e.value()
        0.5
    """

    def __init__(self) -> None:
        self.err = 0.0
        self.ref = 0.0

    def add(self, out: Any, ref: list[Tensor]) -> None:
        leaves = [t for _, t in flatten_outputs(out)]
        if len(leaves) != len(ref):
            raise CalibrationError(
                f"the rewritten model returns {len(leaves)} output tensors, the original {len(ref)}. "
                "Hint: calibrate a model against the one it was rewritten from."
            )
        for a, r in zip(leaves, ref):
            r64, a64 = r.to(torch.float64), a.detach().to(r.device, torch.float64)
            self.err += float(((a64 - r64) ** 2).sum())
            self.ref += float((r64 * r64).sum())

    def value(self) -> float:
        return math.sqrt(self.err / self.ref) if self.ref > 0 else (0.0 if self.err == 0 else math.inf)
