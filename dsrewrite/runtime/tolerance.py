# SPDX-License-Identifier: Apache-2.0
"""Dtype-aware parity tolerances: how far two computations of the same output may differ.

The deployment checks (BN folding, hoist, ONNX) and the tests use this one table.

Example:
    >>> parity_tolerance(torch.tensor([2.0, -10.0]))
    0.00101
    >>> TOLERANCES[torch.float64]
    (1e-09, 1e-12)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["TOLERANCES", "parity_tolerance"]

#: ``dtype -> (rtol, atol)``; other dtypes use float32's.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (5e-2, 1e-2),
}


def parity_tolerance(reference: Tensor, *, rtol: Optional[float] = None, atol: Optional[float] = None) -> float:
    """The absolute tolerance ``atol + rtol · max|reference|`` for ``reference``'s dtype.

    Defaults (rtol, atol): float32 (1e-4, 1e-5), float64 (1e-9, 1e-12), float16 (1e-2, 1e-3),
    bfloat16 (5e-2, 1e-2).

    Example:
        >>> parity_tolerance(torch.tensor([2.0, -10.0]))
        0.00101
    """
    d_rtol, d_atol = TOLERANCES.get(reference.dtype, TOLERANCES[torch.float32])
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    scale = reference.detach().abs().max().item() if reference.numel() else 0.0
    return float(atol + rtol * scale)
