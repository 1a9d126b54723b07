# SPDX-License-Identifier: Apache-2.0
"""The ``dw_pw`` kind: depthwise k×k (``C_in → m·C_in``, ``groups=C_in``), then pointwise 1×1 (MobileNet).

Initialised from the SVD of the kernel cut per input channel; its least-squares layout
(:mod:`dsrewrite.lstsq`): spatial ``d (C_in, m, K)``, pointwise ``P (C_out, C_in, m)``;
the last stage's features are the pointwise input at the output positions, shared by
every output (``(P, C_in·m)``).

Example:
    >>> from dsrewrite.facts import ConvFact
    >>> f = ConvFact(name="c", cls="Conv2d", conv_type="Conv2d", plain=True, in_channels=64,
    ...     out_channels=128, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
    ...     groups=1, bias=False, padding_mode="zeros", dtype="float32", device="cpu",
    ...     region="c", calls=1, input_shape=(1, 64, 56, 56), output_shape=(1, 128, 56, 56))
    >>> DW_PW.macs(f, 1), DW_PW.params(f, 1)
    (27496448, 8768)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..facts import ConvFact
from ..factorize import PER_INPUT
from ..refit.lstsq import GramStats, dense_dwpw, refit_dwpw_pointwise, refit_dwpw_spatial
from .protocol import LstsqLayout
from .separable import DepthwiseSeparableConv2d
from .svd_kind import SeparableKind, SeparableLayout, bias_row, fact_sizes, kernel_area

__all__ = ["DwPwKind", "DwPwLayout", "DW_PW"]


class DwPwLayout(SeparableLayout):
    """A ``dw_pw`` block as calibration's least-squares problem."""

    def __init__(self, block: DepthwiseSeparableConv2d) -> None:
        super().__init__(block)
        self.joint_dim: Optional[int] = self.c_in * self.k * self.m

    def current(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        dw, pw, b = self._weights()
        return dw.reshape(self.c_in, self.m, self.k), pw.reshape(self.c_out, self.c_in, self.m), b

    def write(self, first: Tensor, last: Tensor, bias: Optional[Tensor]) -> None:
        self._write(first, last, bias)

    def last_features(self, z: Tensor, positions: Tensor) -> Tensor:
        p = positions.to(z.device)
        return z[p[:, 0], :, p[:, 1], p[:, 2]]

    def last_features_from_patches(self, patches: Tensor, first: Tensor) -> Tensor:
        p = patches.reshape(patches.shape[0], self.c_in, self.k)
        return torch.einsum("pck,cmk->pcm", p, first.to(p)).reshape(p.shape[0], self.c_in * self.m)

    def pack_last(self, last: Tensor, bias: Optional[Tensor]) -> Tensor:
        return torch.cat([last.reshape(self.c_out, -1).T, bias_row(bias, self.c_out, last)], 0)

    def unpack_last(self, w: Tensor, has_bias: bool) -> tuple[Tensor, Optional[Tensor]]:
        return w[:-1].T.reshape(self.c_out, self.c_in, self.m), (w[-1] if has_bias else None)

    def dense(self, first: Tensor, last: Tensor) -> Tensor:
        return dense_dwpw(first, last)

    def refit_last(self, stats: GramStats, first: Tensor, *, bias: bool,
                   ridge: float) -> tuple[Tensor, Optional[Tensor]]:
        return refit_dwpw_pointwise(stats, first, bias=bias, ridge=ridge)

    def refit_first(self, stats: GramStats, last: Tensor, bias: Optional[Tensor], *, ridge: float) -> Tensor:
        return refit_dwpw_spatial(stats, last, bias, k=self.k, ridge=ridge)


class DwPwKind(SeparableKind):
    """Depthwise then pointwise; the pointwise runs at the output resolution."""

    name = "dw_pw"
    description = "depthwise k×k then pointwise 1×1 (MobileNet style)"
    slices = PER_INPUT
    stage_names = ("depthwise", "pointwise")
    hoist_refusal = ("its first stage is the k×k depthwise, which does not commute with the upsample. "
                     "Hint: rewrite with order='pw_dw' (or 'auto')")

    def macs(self, fact: ConvFact, m: int) -> int:
        cin, cout, k, _, out_px = fact_sizes(fact)
        return k * m * cin * out_px + m * cin * cout * out_px

    def params(self, fact: ConvFact, m: int) -> int:
        cin, cout = fact.in_channels, fact.out_channels
        return cin * m * kernel_area(fact) + m * cin * cout + (cout if fact.bias else 0)

    def layout(self, block: DepthwiseSeparableConv2d) -> LstsqLayout:  # type: ignore[override]
        return DwPwLayout(block)


DW_PW = DwPwKind()
