# SPDX-License-Identifier: Apache-2.0
"""What the two SVD-initialised kinds (``dw_pw``, ``pw_dw``) share: both build a
:class:`~dsrewrite.kinds.separable.DepthwiseSeparableConv2d` and differ in the order of
its stages, the slicing of the kernel's SVD, their costs and their least-squares layout.

Example:
    >>> from torch import nn
    >>> from dsrewrite.kinds import get_kind
    >>> from dsrewrite.plan_types import LayerConfig
    >>> kind = get_kind("pw_dw")
    >>> block = kind.build(nn.Conv2d(8, 16, 3), LayerConfig(order=kind.name))
    >>> kind.owns(block), kind.stages(block).first, kind.fold_bn_into(block)
    (True, 'pointwise', 'depthwise')
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..facts import ConvFact
from ..factorize import SliceLayout, rank_for_energy, relative_weight_error
from ..planning.types import LayerConfig
from .protocol import LstsqLayout, Stages
from .separable import DepthwiseSeparableConv2d
from .separable_nd import SeparableConvNd, check_separable

__all__ = ["SeparableKind", "SeparableLayout", "fact_sizes", "kernel_area", "bias_row", "is_transposed"]


def kernel_area(fact: ConvFact) -> int:
    """``K = kh·kw`` of a fact's kernel (any number of spatial dims)."""
    k = 1
    for s in fact.kernel_size:
        k *= int(s)
    return k


def fact_sizes(fact: ConvFact) -> tuple[int, int, int, int, int]:
    """``(C_in, C_out, K, input positions, output positions)`` of a fact (positions over the batch, any dims).

    Raises:
        ValueError: the fact has no recorded shapes.
    """
    if fact.input_shape is None or fact.output_shape is None:
        raise ValueError(f"conv {fact.name!r} has no recorded shapes")
    n_in, n_out = fact.input_shape[0], fact.output_shape[0]
    in_px = n_in * _prod(fact.input_shape[2:])
    out_px = n_out * _prod(fact.output_shape[2:])
    return fact.in_channels, fact.out_channels, kernel_area(fact), in_px, out_px


def _prod(values: tuple[int, ...]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def is_transposed(fact: ConvFact) -> bool:
    """Whether the fact is a transposed conv (``ConvTranspose1d/2d/3d``)."""
    return "Transpose" in fact.conv_type


class SeparableKind:
    """Base of the built-in kinds; subclasses set the class attributes and the costs."""

    name: str
    description: str
    auto: bool = True
    hoist_refusal: Optional[str] = None
    #: which SVD slicing initialises the block (:mod:`dsrewrite.factorize`)
    slices: SliceLayout
    #: names of the (first, last) stages of the block
    stage_names: tuple[str, str]

    def __repr__(self) -> str:
        return f"<replacement kind {self.name!r}>"

    def check(self, conv: nn.Module, *, name: str = "") -> None:
        check_separable(conv, name=name)

    def macs(self, fact: ConvFact, m: int) -> int:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    def params(self, fact: ConvFact, m: int) -> int:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    def rank_for_energy(self, weight: Tensor, energy: float) -> int:
        return rank_for_energy(weight, energy, self.slices)

    def weight_error(self, weight: Tensor, m: int) -> float:
        return relative_weight_error(weight, m, self.slices)

    def build(self, conv: nn.Module, config: LayerConfig, *, init: Optional[str] = None,
              name: str = "") -> nn.Module:
        # a dense regular Conv2d keeps the class earlier versions saved; every other conv the N-d block
        plain_2d = isinstance(conv, nn.Conv2d) and getattr(conv, "groups", None) == 1
        cls = DepthwiseSeparableConv2d if plain_2d else SeparableConvNd
        return cls.from_conv(
            conv,  # type: ignore[arg-type]
            depth_multiplier=config.depth_multiplier,
            order=self.name,
            init=init or config.init,
            mid_norm=config.mid_norm,
            mid_act=config.mid_act,
            name=name,
        )

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, SeparableConvNd) and module.order == self.name

    def stages(self, block: nn.Module) -> Optional[Stages]:
        if not self.owns(block) or type(block).forward is not SeparableConvNd.forward:
            return None
        first, last = self.stage_names
        return Stages(first=first, last=last, spatial="depthwise", mid_norm="mid_norm")

    def fold_bn_into(self, block: nn.Module) -> Optional[str]:
        st = self.stages(block)
        return None if st is None else st.last

    def layout(self, block: nn.Module) -> LstsqLayout:  # pragma: no cover - every subclass has its own
        raise NotImplementedError


class SeparableLayout:
    """Shared parts of the two built-in least-squares layouts (see :mod:`dsrewrite.lstsq`)."""

    relu_refits_first = False

    def __init__(self, block: DepthwiseSeparableConv2d) -> None:
        self.block = block
        #: transposed block: patches are those of its ``ConvTransposeNd`` (:mod:`dsrewrite.refit.patches_transposed`)
        self.transposed = bool(getattr(block, "transposed", False))
        self.k = _prod(tuple(block.kernel_size))
        self.m = block.depth_multiplier
        self.c_in, self.c_out = block.in_channels, block.out_channels
        #: groups of the conv (> 1: the pointwise stage is grouped; the refit is then last-stage only)
        self.groups = int(block.groups)
        self.c_in_g = self.c_in // self.groups
        self.linear = block.is_linear

    @property
    def last_stage(self) -> nn.Module:
        return self.block.last_stage

    def _weights(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        blk = self.block
        b = blk.bias
        return (blk.depthwise.weight.detach().to(torch.float64), blk.pointwise.weight.detach().to(torch.float64),
                None if b is None else b.detach().to(torch.float64))

    def _write(self, depthwise: Tensor, pointwise: Tensor, bias: Optional[Tensor]) -> None:
        blk = self.block
        with torch.no_grad():
            blk.depthwise.weight.copy_(depthwise.reshape(blk.depthwise.weight.shape))
            blk.pointwise.weight.copy_(pointwise.reshape(blk.pointwise.weight.shape))
            if bias is not None and blk.bias is not None:
                blk.bias.copy_(bias)


def bias_row(bias: Optional[Tensor], c_out: int, like: Tensor) -> Tensor:
    """The bias as a ``(1, C_out)`` float64 row (zeros when ``None``)."""
    return (torch.zeros(c_out, dtype=torch.float64, device=like.device) if bias is None else bias).reshape(1, c_out)
