# SPDX-License-Identifier: Apache-2.0
"""The "patches" of a transposed conv: the input values each output position of a ``ConvTransposeNd`` reads.

A transposed conv ``y = conv_transpose(z, w)`` (stride ``s``, padding ``p``, dilation ``d``)
is linear in ``w``: output position ``q`` receives ``w[..., k] · z[i]`` for every kernel
offset ``k`` with ``q = i·s − p + k·d`` and ``0 ≤ i < size`` (per spatial dim). That is a
regular conv of the zero-stuffed, padded input with the flipped kernel; here the patch
entry for offset ``k`` is ``z[(q + p − k·d) / s]`` where that is an integer inside the input,
else 0, with ``k`` in row-major order of the *unflipped* kernel, so that
``patches @ w.reshape(C_in, C_out, K)`` gives the output (``output_padding`` only makes the
output larger; it changes no value). Calibration uses it for the last stage of ``pw_dw``
transposed blocks (the depthwise ``ConvTransposeNd``) and for joint refits of transposed blocks.

Example:
    >>> import torch
    >>> z = torch.randn(2, 3, 5, dtype=torch.float64)
    >>> w = torch.randn(3, 4, 4, dtype=torch.float64)  # (C_in, C_out, k)
    >>> y = torch.nn.functional.conv_transpose1d(z, w, stride=2, padding=1)  # (2, 4, 10)
    >>> pos = torch.tensor([[0, 0], [1, 5], [1, 9]])
    >>> p = gather_transposed_patches(z, pos, (4,), stride=2, padding=1)  # (3, 3, 4)
    >>> torch.allclose(torch.einsum("pck,cok->po", p, w), y[pos[:, 0], :, pos[:, 1]])
    True
"""

from __future__ import annotations

import itertools
from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["gather_transposed_patches"]

Size = Union[int, Sequence[int]]


def _tuple(v: Size, d: int) -> tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * d


def gather_transposed_patches(z: Tensor, positions: Tensor, kernel_size: Sequence[int], stride: Size = 1,
                              padding: Size = 0, dilation: Size = 1) -> Tensor:
    """The ``(P, C, K)`` values of ``z`` that a ``ConvTransposeNd`` combines at output ``positions`` ``(P, 1 + d)``.

    ``z`` is the transposed conv's input ``(N, C, *spatial)``, ``d = len(kernel_size)``; entries
    no input position feeds are 0. ``padding`` is an int or a tuple (as ``ConvTransposeNd``
    takes it). Raises ``ValueError`` on mismatched shapes.
    """
    d = len(kernel_size)
    if z.dim() != d + 2 or positions.dim() != 2 or positions.shape[1] != d + 1:
        raise ValueError(f"need z (N, C, {d} spatial dims) and positions (P, {d + 1}); got "
                         f"{tuple(z.shape)} and {tuple(positions.shape)}")
    st, pad, dil = _tuple(stride, d), _tuple(padding, d), _tuple(dilation, d)
    pos = positions.to(z.device)
    n = pos[:, 0]
    moved = z.movedim(1, -1)  # (N, *spatial, C)
    sizes = z.shape[2:]
    cols = []
    for offs in itertools.product(*(range(k) for k in kernel_size)):
        ok = torch.ones(pos.shape[0], dtype=torch.bool, device=z.device)
        idx = []
        for i in range(d):
            num = pos[:, 1 + i] + pad[i] - offs[i] * dil[i]
            src = torch.div(num, st[i], rounding_mode="floor")
            ok &= (num - src * st[i] == 0) & (src >= 0) & (src < sizes[i])
            idx.append(src.clamp(0, sizes[i] - 1))
        v = moved[(n, *idx)]  # (P, C)
        cols.append(torch.where(ok.unsqueeze(1), v, torch.zeros((), dtype=v.dtype, device=v.device)))
    return torch.stack(cols, dim=2)
