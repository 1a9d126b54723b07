# SPDX-License-Identifier: Apache-2.0
"""The ``dw_pw`` kind: depthwise k×k (``C_in → m·C_in``, ``groups=C_in``), then pointwise 1×1 (MobileNet).

For any conv (1/2/3-d, grouped, transposed; :mod:`dsrewrite.kinds.separable_nd`). MACs:
``K·m·C_in`` per output position (per *input* position for a transposed conv) plus
``m·C_in·C_out/groups`` per output position.

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
from ..refit.patches_nd import values_at
from .protocol import LstsqLayout
from .separable import DepthwiseSeparableConv2d
from .svd_kind import SeparableKind, SeparableLayout, bias_row, fact_sizes, is_transposed, kernel_area

__all__ = ["DwPwKind", "DwPwLayout", "DW_PW"]


class DwPwLayout(SeparableLayout):
    """A ``dw_pw`` block as calibration's least-squares problem."""

    def __init__(self, block: DepthwiseSeparableConv2d) -> None:
        super().__init__(block)
        # grouped: last stage only, one small problem per output over its group's features
        self.joint_dim: Optional[int] = self.c_in * self.k * self.m if self.groups == 1 else None

    def current(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        dw, pw, b = self._weights()
        return dw.reshape(self.c_in, self.m, self.k), pw.reshape(self.c_out, self.c_in_g, self.m), b

    def write(self, first: Tensor, last: Tensor, bias: Optional[Tensor]) -> None:
        self._write(first, last, bias)

    def last_features(self, z: Tensor, positions: Tensor) -> Tensor:
        f = values_at(z, positions)  # (P, C_in·m)
        if self.groups == 1:
            return f
        g, per = self.groups, self.c_out // self.groups  # each output sees its group's C_in/g·m channels
        return f.reshape(f.shape[0], g, 1, -1).expand(-1, -1, per, -1).reshape(f.shape[0], self.c_out, -1)

    def last_features_from_patches(self, patches: Tensor, first: Tensor) -> Tensor:
        p = patches.reshape(patches.shape[0], self.c_in, self.k)
        return torch.einsum("pck,cmk->pcm", p, first.to(p)).reshape(p.shape[0], self.c_in * self.m)

    def pack_last(self, last: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.groups > 1:  # (C_out, C_in/g·m + 1, 1): one problem per output
            return torch.cat([last.reshape(self.c_out, -1), bias_row(bias, self.c_out, last).T], 1).unsqueeze(-1)
        return torch.cat([last.reshape(self.c_out, -1).T, bias_row(bias, self.c_out, last)], 0)

    def unpack_last(self, w: Tensor, has_bias: bool) -> tuple[Tensor, Optional[Tensor]]:
        if self.groups > 1:
            return w[:, :-1, 0].reshape(self.c_out, self.c_in_g, self.m), (w[:, -1, 0] if has_bias else None)
        return w[:-1].T.reshape(self.c_out, self.c_in, self.m), (w[-1] if has_bias else None)

    def dense(self, first: Tensor, last: Tensor) -> Tensor:
        return dense_dwpw(first, last)

    def refit_last(self, stats: GramStats, first: Tensor, *, bias: bool,
                   ridge: float) -> tuple[Tensor, Optional[Tensor]]:
        return refit_dwpw_pointwise(stats, first, bias=bias, ridge=ridge)

    def refit_first(self, stats: GramStats, last: Tensor, bias: Optional[Tensor], *, ridge: float) -> Tensor:
        return refit_dwpw_spatial(stats, last, bias, k=self.k, ridge=ridge)


class DwPwKind(SeparableKind):
    """Depthwise then pointwise; the pointwise runs at the output resolution.

    Any conv :func:`~dsrewrite.kinds.separable_nd.check_separable` accepts: 1/2/3-d, grouped
    (the pointwise keeps the groups), transposed (the depthwise stage is a ``ConvTransposeNd``,
    which runs per *input* position, and the pointwise runs at the upsampled resolution).
    """

    name = "dw_pw"
    description = "depthwise k×k then pointwise 1×1 (MobileNet style)"
    slices = PER_INPUT
    stage_names = ("depthwise", "pointwise")
    hoist_refusal = ("its first stage is the k×k depthwise, which does not commute with the upsample. "
                     "Hint: rewrite with order='pw_dw' (or 'auto')")

    def macs(self, fact: ConvFact, m: int) -> int:
        cin, cout, k, in_px, out_px = fact_sizes(fact)
        # the depthwise stage: per output position (regular), per input position (transposed)
        spatial = k * m * cin * (in_px if is_transposed(fact) else out_px)
        return spatial + m * cin * (cout // fact.groups) * out_px

    def params(self, fact: ConvFact, m: int) -> int:
        cin, cout = fact.in_channels, fact.out_channels
        return cin * m * kernel_area(fact) + m * cin * (cout // fact.groups) + (cout if fact.bias else 0)

    def layout(self, block: DepthwiseSeparableConv2d) -> LstsqLayout:  # type: ignore[override]
        return DwPwLayout(block)


DW_PW = DwPwKind()
