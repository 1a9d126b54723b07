"""A toy replacement kind that only the tests register: ``dw_pw`` with a grouped pointwise stage.

``dw_pw_g2`` puts a depthwise k×k (``C_in → m·C_in``, ``groups=C_in``) and then a
pointwise 1×1 with ``groups=2`` in place of a dense conv: output group ``g`` sees only
the input channels of group ``g``. At full rank (``m = kh·kw``) the block is exactly the
conv with its kernel's off-diagonal blocks zeroed; that share of the kernel is what it
cannot represent, and its weight error says so.

Everything here uses public dsrewrite API only: the point of the test is that a new kind
needs this one file and no change to the package.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from dsrewrite.errors import UnsupportedConvError
from dsrewrite.factorize import PER_INPUT, factorize, truncation_error
from dsrewrite.kinds import Stages
from dsrewrite.kinds.separable import check_convertible
from dsrewrite.lstsq import GramStats, dense_dwpw

GROUPS = 2


class GroupedDwPw(nn.Module):
    """Depthwise k×k then a grouped (``groups=2``) pointwise 1×1; conv hyperparameters as attributes."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 depth_multiplier: int = 1) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels, self.depth_multiplier = in_channels, out_channels, depth_multiplier
        mid = depth_multiplier * in_channels
        self.depthwise = nn.Conv2d(in_channels, mid, kernel_size, stride, padding, dilation, groups=in_channels,
                                   bias=False, padding_mode=padding_mode, **fk)
        self.pointwise = nn.Conv2d(mid, out_channels, 1, groups=GROUPS, bias=bias, **fk)

    kernel_size = property(lambda self: self.depthwise.kernel_size)
    stride = property(lambda self: self.depthwise.stride)
    padding = property(lambda self: self.depthwise.padding)
    dilation = property(lambda self: self.depthwise.dilation)
    padding_mode = property(lambda self: self.depthwise.padding_mode)
    bias = property(lambda self: self.pointwise.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


def _area(kernel_size) -> int:
    return math.prod(int(s) for s in kernel_size)


def diagonal_blocks(weight: Tensor) -> list[Tensor]:
    """The kernel's diagonal blocks ``W[out group g, in group g]``."""
    co, ci = weight.shape[0] // GROUPS, weight.shape[1] // GROUPS
    return [weight[g * co:(g + 1) * co, g * ci:(g + 1) * ci] for g in range(GROUPS)]


def block_diagonal(weight: Tensor) -> Tensor:
    """The kernel with its off-diagonal blocks zeroed: what the block represents at full rank."""
    out = torch.zeros_like(weight)
    co, ci = weight.shape[0] // GROUPS, weight.shape[1] // GROUPS
    for g, blk in enumerate(diagonal_blocks(weight)):
        out[g * co:(g + 1) * co, g * ci:(g + 1) * ci] = blk
    return out


class ToyLayout:
    """Calibration's view: last-stage refits only, one small problem per output channel over its group."""

    linear = True
    joint_dim: Optional[int] = None  # no joint refit for the toy
    relu_refits_first = False

    def __init__(self, block: GroupedDwPw) -> None:
        self.block = block
        self.m, self.k = block.depth_multiplier, _area(block.kernel_size)
        self.c_in, self.c_out = block.in_channels, block.out_channels
        self.d_g = self.c_in * self.m // GROUPS  # last-stage features per group
        self.group_of = torch.arange(self.c_out) // (self.c_out // GROUPS)

    @property
    def last_stage(self) -> nn.Module:
        return self.block.pointwise

    def current(self):
        b = self.block.bias
        return (self.block.depthwise.weight.detach().to(torch.float64).reshape(self.c_in, self.m, self.k),
                self.block.pointwise.weight.detach().to(torch.float64).reshape(self.c_out, self.d_g),
                None if b is None else b.detach().to(torch.float64))

    def write(self, first: Tensor, last: Tensor, bias: Optional[Tensor]) -> None:
        blk = self.block
        with torch.no_grad():
            blk.depthwise.weight.copy_(first.reshape(blk.depthwise.weight.shape))
            blk.pointwise.weight.copy_(last.reshape(blk.pointwise.weight.shape))
            if bias is not None and blk.bias is not None:
                blk.bias.copy_(bias)

    def _grouped(self, z_at: Tensor) -> Tensor:  # (P, C_in·m) -> (P, C_out, D_g)
        return z_at.reshape(z_at.shape[0], GROUPS, self.d_g)[:, self.group_of.to(z_at.device)]

    def last_features(self, z: Tensor, positions: Tensor) -> Tensor:
        p = positions.to(z.device)
        return self._grouped(z[p[:, 0], :, p[:, 1], p[:, 2]])

    def last_features_from_patches(self, patches: Tensor, first: Tensor) -> Tensor:
        p = patches.reshape(patches.shape[0], self.c_in, self.k)
        return self._grouped(torch.einsum("pck,cmk->pcm", p, first.to(p)).reshape(p.shape[0], -1))

    def pack_last(self, last: Tensor, bias: Optional[Tensor]) -> Tensor:
        b = torch.zeros(self.c_out, dtype=last.dtype, device=last.device) if bias is None else bias.to(last)
        return torch.cat([last, b[:, None]], 1).unsqueeze(-1)

    def unpack_last(self, w: Tensor, has_bias: bool):
        return w[:, :-1, 0], (w[:, -1, 0] if has_bias else None)

    def dense(self, first: Tensor, last: Tensor) -> Tensor:
        full = torch.zeros(self.c_out, self.c_in * self.m, dtype=last.dtype, device=last.device)
        for o in range(self.c_out):
            g = int(self.group_of[o])
            full[o, g * self.d_g:(g + 1) * self.d_g] = last[o]
        return dense_dwpw(first, full.reshape(self.c_out, self.c_in, self.m))

    def refit_last(self, stats: GramStats, first: Tensor, *, bias: bool, ridge: float):
        raise NotImplementedError("the toy kind has no joint refit (joint_dim is None)")

    def refit_first(self, stats: GramStats, last: Tensor, bias: Optional[Tensor], *, ridge: float) -> Tensor:
        raise NotImplementedError("the toy kind has no joint refit (joint_dim is None)")


class GroupedDwPwKind:
    """The kind object: every member of dsrewrite.kinds.ReplacementKind."""

    name = "dw_pw_g2"
    description = "depthwise k×k then a pointwise 1×1 with groups=2 (test-only toy)"
    auto = False
    hoist_refusal = "its first stage is the k×k depthwise (toy kind)"

    def check(self, conv: nn.Module, *, name: str = "") -> None:
        check_convertible(conv, name=name)
        if conv.in_channels % GROUPS or conv.out_channels % GROUPS:
            raise UnsupportedConvError(f"conv {name!r}: channels must be divisible by {GROUPS} for {self.name}")

    def macs(self, fact, m: int) -> int:
        if fact.input_shape is None or fact.output_shape is None:
            raise ValueError(f"conv {fact.name!r} has no recorded shapes")
        n, _, ho, wo = fact.output_shape
        cin, cout, px = fact.in_channels, fact.out_channels, n * ho * wo
        return _area(fact.kernel_size) * m * cin * px + m * cin * cout // GROUPS * px

    def params(self, fact, m: int) -> int:
        cin, cout = fact.in_channels, fact.out_channels
        return cin * m * _area(fact.kernel_size) + m * cin * cout // GROUPS + (cout if fact.bias else 0)

    def weight_error(self, weight: Tensor, m: int) -> float:
        w = weight.detach().to(torch.float64)
        total = float((w * w).sum())
        if total == 0.0:
            return 0.0
        lost = float(((w - block_diagonal(w)) ** 2).sum())
        lost += sum(float(truncation_error(blk, m, PER_INPUT)) for blk in diagonal_blocks(w))
        return math.sqrt(lost / total)

    def rank_for_energy(self, weight: Tensor, energy: float) -> int:
        k = _area(weight.shape[2:])
        return next((m for m in range(1, k + 1) if 1 - self.weight_error(weight, m) ** 2 >= energy - 1e-12), k)

    def build(self, conv: nn.Module, config, *, init: Optional[str] = None, name: str = "") -> nn.Module:
        self.check(conv, name=name)
        w, m = conv.weight, config.depth_multiplier
        block = GroupedDwPw(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                            device=w.device, dtype=w.dtype, depth_multiplier=m)
        ci = conv.in_channels // GROUPS
        with torch.no_grad():
            if (init or config.init) == "svd":
                for g, blk in enumerate(diagonal_blocks(w.detach())):
                    spatial, pointwise = factorize(blk, m, PER_INPUT)
                    block.depthwise.weight[g * ci * m:(g + 1) * ci * m].copy_(spatial)
                    block.pointwise.weight[g * blk.shape[0]:(g + 1) * blk.shape[0]].copy_(pointwise)
            if conv.bias is not None:
                block.bias.copy_(conv.bias.detach())
        for p in block.parameters():
            p.requires_grad_(w.requires_grad)
        return block.train(conv.training)

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, GroupedDwPw)

    def stages(self, block: nn.Module) -> Optional[Stages]:
        if not self.owns(block) or type(block).forward is not GroupedDwPw.forward:
            return None
        return Stages(first="depthwise", last="pointwise", spatial="depthwise", mid_norm=None)

    def fold_bn_into(self, block: nn.Module) -> Optional[str]:
        return "pointwise" if self.stages(block) is not None else None

    def layout(self, block: nn.Module) -> ToyLayout:
        return ToyLayout(block)


class ToyNet(nn.Module):
    """stem (dense) → ReLU → body (the conv the toy kind replaces) → BN → ReLU → 1×1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12))
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.body(torch.relu(self.stem(x)))))
