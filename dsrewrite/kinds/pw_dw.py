# SPDX-License-Identifier: Apache-2.0
"""The ``pw_dw`` kind: pointwise 1×1 (``C_in → m·C_out``), then a k×k with ``groups=C_out`` (blueprint).

For any conv (1/2/3-d, grouped, transposed; :mod:`dsrewrite.kinds.separable_nd`). MACs:
``m·C_out·C_in/groups`` per input position plus ``K·m·C_out`` per output position (per
*input* position for a transposed conv: the whole block then runs at the low resolution).

Initialised from the SVD of the kernel cut per output filter; its least-squares layout
(:mod:`dsrewrite.lstsq`): pointwise ``Q (C_out, m, C_in)``, spatial ``S (C_out, m, K)``;
the last stage's features are the k×k patches of each output's ``m`` channels, one small
problem per output (``(P, C_out, m·K)``; for a transposed block the patches of its
``ConvTransposeNd``, :mod:`dsrewrite.refit.patches_transposed`). Its first stage is a 1×1 conv, so the
deployment hoist can move it above an upsample.

Example:
    >>> from dsrewrite.facts import ConvFact
    >>> f = ConvFact(name="c", cls="Conv2d", conv_type="Conv2d", plain=True, in_channels=96,
    ...     out_channels=32, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1),
    ...     groups=1, bias=True, padding_mode="zeros", dtype="float32", device="cpu",
    ...     region="c", calls=1, input_shape=(1, 96, 16, 16), output_shape=(1, 32, 8, 8))
    >>> PW_DW.macs(f, 1), PW_DW.params(f, 1)
    (804864, 3392)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..facts import ConvFact
from ..factorize import PER_OUTPUT
from ..refit.lstsq import GramStats, dense_pwdw, refit_pwdw_pointwise, refit_pwdw_spatial
from ..refit.patches_nd import gather_patches_nd
from ..refit.patches_transposed import gather_transposed_patches
from .protocol import LstsqLayout
from .separable import DepthwiseSeparableConv2d
from .svd_kind import SeparableKind, SeparableLayout, bias_row, fact_sizes, is_transposed, kernel_area

__all__ = ["PwDwKind", "PwDwLayout", "PW_DW"]


class PwDwLayout(SeparableLayout):
    """A ``pw_dw`` block as calibration's least-squares problem."""

    relu_refits_first = True  # the first stage is where the channels mix

    def __init__(self, block: DepthwiseSeparableConv2d) -> None:
        super().__init__(block)
        # grouped: last stage only (the last stage's features do not depend on the groups)
        self.joint_dim: Optional[int] = self.c_in * self.k if self.groups == 1 else None

    def current(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        dw, pw, b = self._weights()
        return pw.reshape(self.c_out, self.m, self.c_in_g), dw.reshape(self.c_out, self.m, self.k), b

    def write(self, first: Tensor, last: Tensor, bias: Optional[Tensor]) -> None:
        self._write(last, first, bias)

    def last_features(self, z: Tensor, positions: Tensor) -> Tensor:
        sp = self.block.depthwise
        if self.transposed:  # the transposed depthwise's input values at each output position
            p = gather_transposed_patches(z, positions, sp.kernel_size, sp.stride, sp.padding, sp.dilation)
        else:
            p = gather_patches_nd(z, positions, sp.kernel_size, sp.stride, sp.padding, sp.dilation,
                                  sp.padding_mode)
        return p.reshape(p.shape[0], self.c_out, self.m * self.k)  # groups of m channels per output

    def last_features_from_patches(self, patches: Tensor, first: Tensor) -> Tensor:
        p = patches.reshape(patches.shape[0], self.c_in, self.k)
        return torch.einsum("pck,ojc->pojk", p, first.to(p)).reshape(p.shape[0], self.c_out, self.m * self.k)

    def pack_last(self, last: Tensor, bias: Optional[Tensor]) -> Tensor:
        return torch.cat([last.reshape(self.c_out, -1), bias_row(bias, self.c_out, last).T], 1).unsqueeze(-1)

    def unpack_last(self, w: Tensor, has_bias: bool) -> tuple[Tensor, Optional[Tensor]]:
        return w[:, :-1, 0].reshape(self.c_out, self.m, self.k), (w[:, -1, 0] if has_bias else None)

    def dense(self, first: Tensor, last: Tensor) -> Tensor:
        return dense_pwdw(first, last)

    def refit_last(self, stats: GramStats, first: Tensor, *, bias: bool,
                   ridge: float) -> tuple[Tensor, Optional[Tensor]]:
        return refit_pwdw_spatial(stats, first, k=self.k, bias=bias, ridge=ridge)

    def refit_first(self, stats: GramStats, last: Tensor, bias: Optional[Tensor], *, ridge: float) -> Tensor:
        return refit_pwdw_pointwise(stats, last, bias, in_channels=self.c_in, ridge=ridge)


class PwDwKind(SeparableKind):
    """Pointwise then a grouped k×k; the pointwise runs at the *input* resolution.

    Any conv :func:`~dsrewrite.kinds.separable_nd.check_separable` accepts. For a transposed
    conv both stages run per *input* position (the pointwise before the upsampling), which
    is why ``order: auto`` usually picks it for upsampling layers.
    """

    name = "pw_dw"
    description = "pointwise 1×1 then a k×k with groups=C_out (blueprint style)"
    slices = PER_OUTPUT
    stage_names = ("pointwise", "depthwise")
    hoist_refusal = None

    def macs(self, fact: ConvFact, m: int) -> int:
        cin, cout, k, in_px, out_px = fact_sizes(fact)
        # the k-stage: per output position (regular), per input position (transposed: all at low resolution)
        spatial = k * m * cout * (in_px if is_transposed(fact) else out_px)
        return m * cout * (cin // fact.groups) * in_px + spatial

    def params(self, fact: ConvFact, m: int) -> int:
        cin, cout = fact.in_channels, fact.out_channels
        return m * cout * (cin // fact.groups) + kernel_area(fact) * m * cout + (cout if fact.bias else 0)

    def layout(self, block: DepthwiseSeparableConv2d) -> LstsqLayout:  # type: ignore[override]
        return PwDwLayout(block)


PW_DW = PwDwKind()
