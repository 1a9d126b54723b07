# SPDX-License-Identifier: Apache-2.0
"""What the deployment forms share: their input and parity errors, and the parity comparison.

A deployment form (BN folded, hoisted, channels_last, ONNX) must give the original's
outputs up to :func:`~dsrewrite.runtime.tolerance.parity_tolerance`.

Example:
    >>> import torch
    >>> max_abs_diff([torch.ones(2)], [torch.zeros(2)], "x")
    (1.0, 0.0)
"""

from __future__ import annotations

from typing import Any, Sequence, Union

from torch import Tensor

from ..errors import RewriteError, UsageError
from ..runtime.run import flatten_outputs

__all__ = ["DeployInputError", "ParityError", "Inputs", "as_tuple", "flat_outputs", "max_abs_diff"]

Inputs = Union[Tensor, Sequence[Tensor]]


class DeployInputError(UsageError):
    """The model or input cannot be put into an inference form as asked (e.g. a BN in training mode)."""


class ParityError(RewriteError):
    """A deployment form's outputs differ from the original's by more than the stated tolerance."""


def as_tuple(inputs: Inputs) -> tuple[Tensor, ...]:
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and all(isinstance(t, Tensor) for t in inputs):
        return tuple(inputs)
    raise DeployInputError(
        f"example_input must be a tensor or a tuple/list of tensors, got {type(inputs).__name__}. "
        "Hint: pass e.g. torch.randn(1, 3, 512, 512)."
    )


def flat_outputs(out: Any, where: str) -> list[Tensor]:
    """The tensors of ``out`` in the model's own order (tuples/lists by position, dicts in their insertion
    order, as ``torch.onnx``/``torch.export`` flatten them); anything else is refused.

    Example:
        >>> import torch
        >>> [t.item() for t in flat_outputs({"out": torch.zeros(()), "aux": torch.ones(())}, "x")]
        [0.0, 1.0]
    """
    try:
        return [t for _, t in flatten_outputs(out, strict=True, sort_keys=False)]
    except TypeError as exc:
        raise DeployInputError(
            f"{where} returned a {exc}; only tensors, tuples/lists and dicts of tensors "
            "can be compared. Hint: wrap the model so that it returns tensors."
        ) from None


def max_abs_diff(got: list[Tensor], ref: list[Tensor], where: str) -> tuple[float, float]:
    if len(got) != len(ref):
        raise ParityError(f"{where}: {len(got)} outputs against {len(ref)} in the reference.")
    diff, scale = 0.0, 0.0
    for i, (g, r) in enumerate(zip(got, ref)):
        if tuple(g.shape) != tuple(r.shape):
            raise ParityError(f"{where}: output {i} has shape {tuple(g.shape)}, the reference {tuple(r.shape)}.")
        g64, r64 = g.detach().cpu().double(), r.detach().cpu().double()
        if g64.numel():
            diff = max(diff, (g64 - r64).abs().max().item())
            scale = max(scale, r64.abs().max().item())
    return diff, scale
