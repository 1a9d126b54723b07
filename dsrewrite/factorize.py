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
    "svd_signed",
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
    if not 3 <= weight.dim() <= 5:
        raise ValueError(
            "expected a conv kernel (C_out, C_in, *k) with 1 to 3 spatial dims (3-d, 4-d or 5-d), "
            f"got shape {tuple(weight.shape)}"
        )
    return layout_of(order)


def _area(weight: Tensor) -> int:
    k = 1
    for v in weight.shape[2:]:
        k *= int(v)
    return k


def kernel_slices(weight: Tensor, order: LayoutLike = "dw_pw", *, groups: int = 1) -> Tensor:
    """Return the batch of matrices whose SVDs define the factorisation.

    ``weight`` is a conv kernel ``(C_out, C_in/groups, *k)`` with 1 to 3 spatial dims
    (``K = ∏k``). ``dw_pw``: shape ``(C_in, C_out/groups, K)`` (one matrix per input
    channel, over the outputs of its group); ``pw_dw``: shape ``(C_out, C_in/groups, K)``
    (one matrix per output filter).

    Example:
        >>> kernel_slices(torch.zeros(8, 4, 3, 5)).shape
        torch.Size([4, 8, 15])
        >>> kernel_slices(torch.zeros(8, 2, 3, 3, 3), groups=2).shape
        torch.Size([4, 4, 27])
    """
    layout = _check(weight, order)
    c_out, c_in_g = weight.shape[:2]
    k = _area(weight)
    if c_out % groups:
        raise ValueError(f"C_out={c_out} is not divisible by groups={groups}")
    if layout is PER_INPUT:
        c_out_g = c_out // groups
        return weight.reshape(groups, c_out_g, c_in_g, k).permute(0, 2, 1, 3).reshape(groups * c_in_g, c_out_g, k)
    return weight.reshape(c_out, c_in_g, k)


def svd_signed(mats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin float64 SVD of a batch of matrices with a deterministic sign.

    The largest-magnitude entry of every right singular vector is made positive.

    Example:
        >>> u, s, vh = svd_signed(torch.eye(2).unsqueeze(0))
        >>> s.tolist()
        [[1.0, 1.0]]
    """
    u, s, vh = torch.linalg.svd(mats.to(torch.float64), full_matrices=False)
    idx = vh.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(vh, -1, idx))
    sign[sign == 0] = 1.0
    return u * sign.transpose(-1, -2), s, vh * sign


def _svd(weight: Tensor, order: LayoutLike, groups: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    return svd_signed(kernel_slices(weight.detach(), order, groups=groups))


def spectrum(weight: Tensor, order: LayoutLike = "dw_pw") -> Tensor:
    """Singular values of every kernel slice, float64, shape ``(B, min(R, K))``, descending (any 1-3 spatial dims).

    Example:
        >>> spectrum(torch.randn(8, 4, 3, 3)).shape
        torch.Size([4, 8])
    """
    return _svd(weight, order)[1]


def factorize(weight: Tensor, rank: int, order: LayoutLike = "dw_pw", *, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` depthwise-separable factorisation of a dense or grouped kernel.

    ``weight`` is ``(C_out, C_in/groups, *k)`` with 1 to 3 spatial dims (``K = ∏k``);
    ``1`` below stands for one 1 per spatial dim. Returns ``(spatial, pointwise)`` in
    ``weight``'s dtype and device:

    * ``dw_pw``: spatial ``(C_in·m, 1, *k)`` (use ``groups=C_in``),
      pointwise ``(C_out, C_in/groups·m, 1)`` (use ``groups``);
    * ``pw_dw``: pointwise ``(C_out·m, C_in/groups, 1)`` (use ``groups``),
      spatial ``(C_out, m, *k)`` (use ``groups=C_out``).

    Singular values are split evenly (``√σ`` on each stage). Where ``rank``
    exceeds the slice rank the extra components are zero.

    Example:
        >>> s, p = factorize(torch.randn(16, 8, 3, 3), rank=1)
        >>> s.shape, p.shape
        (torch.Size([8, 1, 3, 3]), torch.Size([16, 8, 1, 1]))
        >>> s, p = factorize(torch.randn(16, 4, 3, 3, 3), rank=2, groups=2)
        >>> s.shape, p.shape
        (torch.Size([16, 1, 3, 3, 3]), torch.Size([16, 8, 1, 1, 1]))
    """
    layout = _check(weight, order)
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    c_out, c_in_g = weight.shape[:2]
    kshape, ones = tuple(weight.shape[2:]), (1,) * (weight.dim() - 2)
    c_in, c_out_g = c_in_g * groups, c_out // groups
    u, s, vh = _svd(weight, order, groups)
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
        spatial = right.reshape(c_in * rank, 1, *kshape)
        # left: (C_in, C_out/g, m) -> pointwise[o, c_local*m + j] within o's group
        pointwise = (left.reshape(groups, c_in_g, c_out_g, rank).permute(0, 2, 1, 3)
                     .reshape(c_out, c_in_g * rank, *ones))
    else:
        # left: (C_out, C_in/g, m) -> pointwise[o*m + j, c_local]
        pointwise = left.permute(0, 2, 1).reshape(c_out * rank, c_in_g, *ones)
        # right: (C_out, m, K) -> spatial[o, j]
        spatial = right.reshape(c_out, rank, *kshape)
    return spatial.to(device=device, dtype=dtype), pointwise.to(device=device, dtype=dtype)


def compose(spatial: Tensor, pointwise: Tensor, order: LayoutLike = "dw_pw", *, in_channels: int,
            groups: int = 1) -> Tensor:
    """The kernel ``(C_out, C_in/groups, *k)`` equivalent to a linear two-stage conv.

    Inverse of :func:`factorize` up to truncation; used for checks and calibration.
    ``spatial`` and ``pointwise`` are in the shapes :func:`factorize` returns.

    Example:
        >>> s, p = factorize(torch.randn(6, 3, 3, 3, dtype=torch.float64), rank=9)
        >>> compose(s, p, in_channels=3).shape
        torch.Size([6, 3, 3, 3])
    """
    layout = layout_of(order)
    kshape = tuple(spatial.shape[2:])
    k = 1
    for v in kshape:
        k *= int(v)
    c_in_g = in_channels // groups
    if layout is PER_INPUT:
        c_out = pointwise.shape[0]
        c_out_g = c_out // groups
        m = spatial.shape[0] // in_channels
        sp = spatial.reshape(groups, c_in_g, m, k)  # (g, C_in/g, m, K)
        pw = pointwise.reshape(groups, c_out_g, c_in_g, m)  # (g, C_out/g, C_in/g, m)
        dense = torch.einsum("gocj,gcjk->gock", pw, sp)
        return dense.reshape(c_out, c_in_g, *kshape)
    c_out, m = spatial.shape[0], spatial.shape[1]
    sp = spatial.reshape(c_out, m, k)  # (C_out, m, K)
    pw = pointwise.reshape(c_out, m, c_in_g)  # (C_out, m, C_in/g)
    dense = torch.einsum("ojc,ojk->ock", pw, sp)
    return dense.reshape(c_out, c_in_g, *kshape)


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
