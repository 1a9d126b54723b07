# SPDX-License-Identifier: Apache-2.0
"""im2col for 1-, 2- and 3-d convs: the input patches a conv reads at chosen output positions.

``torch.nn.functional.unfold`` exists for 4-d inputs only; these build the patches of any
``ConvNd`` (``stride``, ``dilation``, integer or ``'same'``/``'valid'`` padding, every
``padding_mode``) by indexing, only at the positions asked for. Patch index ``k`` runs over
the kernel in row-major order, matching ``weight.reshape(C_out, C_in/groups, K)``, so that a
conv's output at a position is ``patches @ weight`` (per group).

Example:
    >>> import torch
    >>> x = torch.randn(2, 3, 9, dtype=torch.float64)
    >>> w = torch.randn(4, 3, 3, dtype=torch.float64)
    >>> pos = torch.tensor([[0, 0], [1, 4], [1, 8]])  # (n, i) on the output grid
    >>> p = gather_patches_nd(x, pos, (3,), padding="same")
    >>> y = torch.nn.functional.conv1d(x, w, padding="same")
    >>> torch.allclose(p.reshape(len(pos), -1) @ w.reshape(4, -1).T, y[pos[:, 0], :, pos[:, 1]])
    True
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["explicit_padding_nd", "gather_patches_nd", "im2col_nd", "sample_positions_nd", "values_at"]

Size = Union[int, Sequence[int]]


def _tuple(v: Size, d: int) -> tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * d


def sample_positions_nd(shape: Sequence[int], count: int, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """``min(count, ∏shape)`` distinct positions ``(n, i, ...)`` of an ``(N, *spatial)`` grid, ``(P, 1 + d)`` long.

    Uniform without replacement, sorted; all positions when ``count`` covers them. For an
    ``(N, H, W)`` grid the positions (and the random draws) are those of
    :func:`dsrewrite.refit.lstsq.sample_positions`.

    Example:
        >>> sample_positions_nd((1, 2, 2, 1), 10).tolist()
        [[0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 1, 0]]
    """
    dims = [int(v) for v in shape]
    total = 1
    for v in dims:
        total *= v
    if count >= total:
        flat = torch.arange(total)
    else:
        flat = torch.randperm(total, generator=generator)[: max(int(count), 0)].sort().values
    cols = []
    for size in reversed(dims):
        cols.append(flat % size)
        flat = flat // size
    return torch.stack(cols[::-1], dim=1)


def values_at(t: Tensor, positions: Tensor) -> Tensor:
    """``t[n, :, i, ...]`` at every position ``(P, 1 + d)`` of an ``(N, C, *spatial)`` tensor: ``(P, C)``.

    Example:
        >>> values_at(torch.arange(8.0).reshape(1, 2, 4), torch.tensor([[0, 3]])).tolist()
        [[3.0, 7.0]]
    """
    p = positions.to(t.device)
    return t.movedim(1, -1)[tuple(p.T)]


def explicit_padding_nd(padding: Union[str, Size], kernel_size: Sequence[int],
                        dilation: Size = 1) -> tuple[tuple[int, int], ...]:
    """``((before, after), ...)`` per spatial dim, resolving ``'same'``/``'valid'`` as PyTorch does.

    Example:
        >>> explicit_padding_nd("same", (4, 3, 2))
        ((1, 2), (1, 1), (0, 1))
    """
    d = len(kernel_size)
    dil = _tuple(dilation, d)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * d
        if padding == "same":
            total = [dil[i] * (kernel_size[i] - 1) for i in range(d)]
            return tuple((t // 2, t - t // 2) for t in total)
        raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
    return tuple((p, p) for p in _tuple(padding, d))


def gather_patches_nd(
    x: Tensor,
    positions: Tensor,
    kernel_size: Sequence[int],
    stride: Size = 1,
    padding: Union[str, Size] = 0,
    dilation: Size = 1,
    padding_mode: str = "zeros",
) -> Tensor:
    """The ``(P, C, K)`` input patches a conv reads for output ``positions`` ``(P, 1 + d)`` = ``(n, i, j, ...)``.

    ``x`` is ``(N, C, *spatial)`` with ``d = len(kernel_size)`` spatial dims (1, 2 or 3).
    """
    d = len(kernel_size)
    if x.dim() != d + 2 or positions.dim() != 2 or positions.shape[1] != d + 1:
        raise ValueError(f"need x (N, C, {d} spatial dims) and positions (P, {d + 1}); got "
                         f"{tuple(x.shape)} and {tuple(positions.shape)}")
    st, dil = _tuple(stride, d), _tuple(dilation, d)
    pads = explicit_padding_nd(padding, kernel_size, dil)
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad: last dim first
    if any(flat):
        x = F.pad(x, flat) if padding_mode == "zeros" else F.pad(x, flat, mode=padding_mode)
    pos = positions.to(x.device)
    n = pos[:, 0]
    base = [pos[:, 1 + i] * st[i] for i in range(d)]
    moved = x.movedim(1, -1)  # (N, *spatial, C)
    cols = []
    for offs in itertools.product(*(range(k) for k in kernel_size)):
        idx = tuple(base[i] + offs[i] * dil[i] for i in range(d))
        cols.append(moved[(n, *idx)])  # (P, C)
    return torch.stack(cols, dim=2)


def im2col_nd(x: Tensor, kernel_size: Sequence[int], stride: Size = 1, padding: Union[str, Size] = 0,
              dilation: Size = 1, padding_mode: str = "zeros") -> tuple[Tensor, Tensor]:
    """All patches of a conv: ``(patches (P, C, K), positions (P, 1 + d))`` over every output position.

    Example:
        >>> x = torch.randn(1, 2, 5, 6, 7, dtype=torch.float64)
        >>> w = torch.randn(3, 2, 3, 3, 3, dtype=torch.float64)
        >>> p, pos = im2col_nd(x, (3, 3, 3), stride=2, padding=1, padding_mode="reflect")
        >>> y = torch.nn.functional.conv3d(torch.nn.functional.pad(x, (1,) * 6, mode="reflect"), w, stride=2)
        >>> torch.allclose((p.reshape(len(pos), -1) @ w.reshape(3, -1).T), y.movedim(1, -1).reshape(-1, 3))
        True
    """
    d = len(kernel_size)
    st, dil = _tuple(stride, d), _tuple(dilation, d)
    pads = explicit_padding_nd(padding, kernel_size, dil)
    out = [x.shape[0]]
    for i in range(d):
        span = x.shape[2 + i] + sum(pads[i]) - dil[i] * (kernel_size[i] - 1) - 1
        out.append(span // st[i] + 1)
    pos = torch.cartesian_prod(*(torch.arange(s) for s in out)).reshape(-1, d + 1)
    return gather_patches_nd(x, pos, kernel_size, st, padding, dil, padding_mode), pos
