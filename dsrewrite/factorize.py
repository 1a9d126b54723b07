# SPDX-License-Identifier: Apache-2.0
"""Depthwise-separable factorisation of a dense convolution kernel: pure tensor maths.

A dense kernel ``W`` of shape ``(C_out, C_in, kh, kw)`` is split into a spatial
(k×k, grouped) stage and a pointwise (1×1) stage. Two orders exist:

``"dw_pw"`` (MobileNet style, depthwise then pointwise)
    For each input channel ``c`` the slice ``W[:, c]`` is a ``C_out × (kh·kw)``
    matrix. Its truncated SVD of rank ``m`` gives ``m`` spatial filters for
    channel ``c`` (the depthwise stage, ``C_in·m`` filters with
    ``groups=C_in``) and their mixing weights (the pointwise stage).

``"pw_dw"`` (blueprint style, pointwise then depthwise)
    For each output filter ``o`` the slice ``W[o]`` is a ``C_in × (kh·kw)``
    matrix. Its rank-``m`` SVD gives the 1×1 projection ``C_in → m`` for that
    filter (the pointwise stage, ``C_out·m`` channels) and ``m`` spatial
    filters summed into output ``o`` (a k×k conv with ``groups=C_out``).

By Eckart–Young each truncation is the best rank-``m`` approximation in
Frobenius norm, so ``‖W - Ŵ‖²`` equals the sum of the discarded squared
singular values, and the factorisation is exact at ``m = kh·kw``.

All functions take and return tensors; no modules. The SVD is computed in
float64 (one batched call per layer) and results are cast to the kernel's dtype.

Example:
    >>> import torch
    >>> from dsrewrite.factorize import factorize, compose
    >>> w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    >>> spatial, pointwise = factorize(w, rank=9, order="dw_pw")
    >>> spatial.shape, pointwise.shape
    (torch.Size([36, 1, 3, 3]), torch.Size([8, 36, 1, 1]))
    >>> torch.allclose(compose(spatial, pointwise, order="dw_pw", in_channels=4), w)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import torch
from torch import Tensor

__all__ = [
    "Order",
    "ORDERS",
    "SliceLayout",
    "PER_INPUT",
    "PER_OUTPUT",
    "LAYOUTS",
    "layout_of",
    "kernel_slices",
    "spectrum",
    "factorize",
    "compose",
    "truncation_error",
    "relative_weight_error",
    "rank_for_energy",
]

Order = Literal["dw_pw", "pw_dw"]


@dataclass(frozen=True)
class SliceLayout:
    """How a dense kernel is cut into the matrices whose SVDs define one factorisation.

    ``per="input"``: one ``C_out × K`` matrix per input channel (the depthwise stage
    comes first); ``per="output"``: one ``C_in × K`` matrix per output filter (the
    pointwise stage comes first). The replacement kinds (:mod:`dsrewrite.kinds`) pick one.
    """

    per: Literal["input", "output"]


#: Slicing per input channel: spatial ``(C_in·m, 1, kh, kw)``, pointwise ``(C_out, C_in·m, 1, 1)``.
PER_INPUT = SliceLayout("input")
#: Slicing per output filter: pointwise ``(C_out·m, C_in, 1, 1)``, spatial ``(C_out, m, kh, kw)``.
PER_OUTPUT = SliceLayout("output")

#: The order names this module's functions accept (the two built-in kinds' names), and their slicing.
LAYOUTS: dict[str, SliceLayout] = {"dw_pw": PER_INPUT, "pw_dw": PER_OUTPUT}
ORDERS: tuple[str, ...] = tuple(LAYOUTS)

LayoutLike = Union[str, SliceLayout]


def layout_of(order: LayoutLike) -> SliceLayout:
    """The :class:`SliceLayout` of an order name (``"dw_pw"``/``"pw_dw"``), or the layout itself.

    Example:
        >>> layout_of("pw_dw") is PER_OUTPUT
        True
    """
    if isinstance(order, SliceLayout):
        return order
    if order not in LAYOUTS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return LAYOUTS[order]


def _check(weight: Tensor, order: LayoutLike) -> SliceLayout:
    if weight.dim() != 4:
        raise ValueError(
            f"expected a 4-d conv kernel (C_out, C_in, kh, kw), got shape {tuple(weight.shape)}"
        )
    return layout_of(order)


def kernel_slices(weight: Tensor, order: LayoutLike = "dw_pw") -> Tensor:
    """Return the batch of matrices whose SVDs define the factorisation.

    ``dw_pw``: shape ``(C_in, C_out, kh·kw)`` (one matrix per input channel);
    ``pw_dw``: shape ``(C_out, C_in, kh·kw)`` (one matrix per output filter).

    Example:
        >>> kernel_slices(torch.zeros(8, 4, 3, 5)).shape
        torch.Size([4, 8, 15])
    """
    layout = _check(weight, order)
    c_out, c_in, kh, kw = weight.shape
    if layout is PER_INPUT:
        return weight.permute(1, 0, 2, 3).reshape(c_in, c_out, kh * kw)
    return weight.reshape(c_out, c_in, kh * kw)


def _svd(weight: Tensor, order: LayoutLike) -> tuple[Tensor, Tensor, Tensor]:
    mats = kernel_slices(weight.detach(), order).to(torch.float64)
    u, s, vh = torch.linalg.svd(mats, full_matrices=False)
    # Fix the sign ambiguity so results are deterministic: make the largest-magnitude
    # entry of every right singular vector (the spatial filter) positive.
    idx = vh.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(vh, -1, idx))
    sign[sign == 0] = 1.0
    vh = vh * sign
    u = u * sign.transpose(-1, -2)
    return u, s, vh


def spectrum(weight: Tensor, order: LayoutLike = "dw_pw") -> Tensor:
    """Singular values of every kernel slice, float64, shape ``(B, min(R, kh·kw))``, descending.

    Example:
        >>> spectrum(torch.randn(8, 4, 3, 3)).shape
        torch.Size([4, 8])
    """
    return _svd(weight, order)[1]


def factorize(weight: Tensor, rank: int, order: LayoutLike = "dw_pw") -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` depthwise-separable factorisation of a dense kernel.

    Returns ``(spatial, pointwise)`` in ``weight``'s dtype and device:

    * ``dw_pw``: spatial ``(C_in·m, 1, kh, kw)`` (use ``groups=C_in``),
      pointwise ``(C_out, C_in·m, 1, 1)``;
    * ``pw_dw``: pointwise ``(C_out·m, C_in, 1, 1)``,
      spatial ``(C_out, m, kh, kw)`` (use ``groups=C_out``).

    Singular values are split evenly (``√σ`` on each stage). Where ``rank``
    exceeds the slice rank the extra components are zero.

    Example:
        >>> s, p = factorize(torch.randn(16, 8, 3, 3), rank=1)
        >>> s.shape, p.shape
        (torch.Size([8, 1, 3, 3]), torch.Size([16, 8, 1, 1]))
    """
    layout = _check(weight, order)
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    c_out, c_in, kh, kw = weight.shape
    u, s, vh = _svd(weight, order)
    r = s.shape[-1]
    keep = min(rank, r)
    root = s[:, :keep].sqrt()
    left = u[:, :, :keep] * root.unsqueeze(1)  # (B, R, keep)
    right = vh[:, :keep, :] * root.unsqueeze(2)  # (B, keep, K)
    if keep < rank:  # pad with zero components
        b, rr, k = left.shape[0], left.shape[1], right.shape[2]
        left = torch.cat([left, left.new_zeros(b, rr, rank - keep)], dim=2)
        right = torch.cat([right, right.new_zeros(b, rank - keep, k)], dim=1)
    dtype, device = weight.dtype, weight.device
    if layout is PER_INPUT:
        # right: (C_in, m, K) -> depthwise filters, channel c*m + j
        spatial = right.reshape(c_in * rank, 1, kh, kw)
        # left: (C_in, C_out, m) -> pointwise[o, c*m + j]
        pointwise = left.permute(1, 0, 2).reshape(c_out, c_in * rank, 1, 1)
    else:
        # left: (C_out, C_in, m) -> pointwise[o*m + j, c]
        pointwise = left.permute(0, 2, 1).reshape(c_out * rank, c_in, 1, 1)
        # right: (C_out, m, K) -> spatial[o, j]
        spatial = right.reshape(c_out, rank, kh, kw)
    return spatial.to(device=device, dtype=dtype), pointwise.to(device=device, dtype=dtype)


def compose(spatial: Tensor, pointwise: Tensor, order: LayoutLike = "dw_pw", *, in_channels: int) -> Tensor:
    """The dense kernel ``(C_out, C_in, kh, kw)`` equivalent to a linear two-stage conv.

    Inverse of :func:`factorize` up to truncation; used for checks and calibration.

    Example:
        >>> s, p = factorize(torch.randn(6, 3, 3, 3, dtype=torch.float64), rank=9)
        >>> compose(s, p, in_channels=3).shape
        torch.Size([6, 3, 3, 3])
    """
    layout = layout_of(order)
    kh, kw = spatial.shape[-2:]
    if layout is PER_INPUT:
        c_out = pointwise.shape[0]
        m = spatial.shape[0] // in_channels
        sp = spatial.reshape(in_channels, m, kh * kw)  # (C_in, m, K)
        pw = pointwise.reshape(c_out, in_channels, m)  # (C_out, C_in, m)
        dense = torch.einsum("ocj,cjk->ock", pw, sp)
        return dense.reshape(c_out, in_channels, kh, kw)
    c_out, m = spatial.shape[0], spatial.shape[1]
    sp = spatial.reshape(c_out, m, kh * kw)  # (C_out, m, K)
    pw = pointwise.reshape(c_out, m, in_channels)  # (C_out, m, C_in)
    dense = torch.einsum("ojc,ojk->ock", pw, sp)
    return dense.reshape(c_out, in_channels, kh, kw)


def truncation_error(weight: Tensor, rank: int, order: LayoutLike = "dw_pw") -> Tensor:
    """Squared Frobenius error of the rank-``rank`` factorisation: the discarded ``Σσ²`` (float64 scalar).

    Example:
        >>> float(truncation_error(torch.randn(8, 4, 3, 3), rank=9))
        0.0
    """
    s = spectrum(weight, order)
    return (s[:, rank:] ** 2).sum()


def relative_weight_error(weight: Tensor, rank: int, order: LayoutLike = "dw_pw") -> float:
    """``‖W − Ŵ‖_F / ‖W‖_F`` for the rank-``rank`` factorisation (0 for a zero kernel).

    Example:
        >>> relative_weight_error(torch.randn(8, 4, 3, 3), rank=9)
        0.0
    """
    s = spectrum(weight, order)
    total = (s**2).sum()
    if float(total) == 0.0:
        return 0.0
    return float(((s[:, rank:] ** 2).sum() / total).sqrt())


def rank_for_energy(weight: Tensor, energy: float, order: LayoutLike = "dw_pw") -> int:
    """Smallest rank ``m`` whose factorisation keeps at least ``energy`` of ``Σσ²`` (over all slices).

    Equivalently the smallest ``m`` with relative weight error ``≤ √(1 − energy)``.

    Example:
        >>> rank_for_energy(torch.randn(8, 4, 3, 3), energy=1.0)
        8
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    s = spectrum(weight, order)
    power = (s**2).sum(dim=0)  # per component index, over slices
    total = float(power.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(power, dim=0) / total
    # tolerate float64 round-off at energy == 1
    hits = (kept >= energy - 1e-12).nonzero()
    return int(hits[0]) + 1 if len(hits) else int(s.shape[-1])
