# SPDX-License-Identifier: Apache-2.0
"""DepthwiseSeparableConv2d: the module the two built-in kinds (``dw_pw``, ``pw_dw``) put in place of a conv.

Its old import path, ``dsrewrite.layers.dsconv`` (and ``dsrewrite.layers``), keeps working.

State-dict keys are stable and independent of the order of the stages:

* ``depthwise.weight``: the spatial k×k stage (``groups=C_in`` for ``dw_pw``,
  ``groups=C_out`` for ``pw_dw``);
* ``pointwise.weight``: the 1×1 stage;
* ``<last stage>.bias``: the bias, on the stage that runs last
  (``pointwise.bias`` for ``dw_pw``, ``depthwise.bias`` for ``pw_dw``);
* ``mid_norm.*``: the optional BatchNorm between the stages.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dsrewrite.layers import DepthwiseSeparableConv2d
    >>> dense = nn.Conv2d(32, 64, 3, padding=1, bias=False)
    >>> sep = DepthwiseSeparableConv2d.from_conv(dense, depth_multiplier=9)
    >>> x = torch.randn(1, 32, 16, 16)
    >>> torch.allclose(sep(x), dense(x), atol=1e-4)
    True
    >>> sum(p.numel() for p in DepthwiseSeparableConv2d.from_conv(dense).parameters())
    2336
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..errors import UnsupportedConvError
from ..factorize import PER_INPUT, SliceLayout, factorize, layout_of

__all__ = [
    "DepthwiseSeparableConv2d",
    "MID_NORMS",
    "MID_ACTS",
    "INITS",
    "make_mid_act",
    "check_convertible",
]

_size_2 = Union[int, tuple[int, int]]

MID_NORMS: tuple[str, ...] = ("batchnorm",)
MID_ACTS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "hardswish": nn.Hardswish,
    "leaky_relu": nn.LeakyReLU,
}
INITS: tuple[str, ...] = ("svd", "random")


def make_mid_act(name: Optional[str]) -> nn.Module:
    """Activation module for ``mid_act`` (``None`` gives ``nn.Identity``).

    Example:
        >>> make_mid_act("relu6")
        ReLU6()
    """
    if name is None:
        return nn.Identity()
    if name not in MID_ACTS:
        raise ValueError(f"mid_act must be None or one of {sorted(MID_ACTS)}, got {name!r}")
    return MID_ACTS[name]()


class DepthwiseSeparableConv2d(nn.Module):
    """A k×k convolution factored into a spatial (grouped) stage and a pointwise 1×1 stage.

    Arguments mirror :class:`torch.nn.Conv2d` (``groups`` excepted) plus:

    Args:
        depth_multiplier: ``m ≥ 1``. ``dw_pw``: the depthwise stage maps
            ``C_in → m·C_in``; ``pw_dw``: the pointwise stage maps ``C_in → m·C_out``.
            The block represents any dense kernel exactly at ``m = kh·kw``.
        order: ``"dw_pw"`` (depthwise then pointwise, MobileNet) or ``"pw_dw"``
            (pointwise then depthwise, blueprint).
        mid_norm: ``None`` or ``"batchnorm"``: a BatchNorm2d between the stages.
        mid_act: ``None`` or an activation name (``"relu6"``, ``"relu"``, ``"silu"``, ...)
            between the stages. Both ``None`` (default) keeps the block linear.

    Stride, dilation, padding and padding_mode live on the spatial stage; the bias
    lives on the last stage.

    Example:
        >>> m = DepthwiseSeparableConv2d(16, 32, 3, padding="same", order="pw_dw")
        >>> m(torch.randn(2, 16, 9, 9)).shape
        torch.Size([2, 32, 9, 9])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2,
        stride: _size_2 = 1,
        padding: Union[str, _size_2] = 0,
        dilation: _size_2 = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        depth_multiplier: int = 1,
        order: str = "dw_pw",
        mid_norm: Optional[str] = None,
        mid_act: Optional[str] = None,
    ) -> None:
        super().__init__()
        spatial_first = layout_of(order) is PER_INPUT  # ValueError for an order this module cannot hold
        if not isinstance(depth_multiplier, int) or depth_multiplier < 1:
            raise ValueError(f"depth_multiplier must be an int >= 1, got {depth_multiplier!r}")
        if mid_norm is not None and mid_norm not in MID_NORMS:
            raise ValueError(f"mid_norm must be None or one of {MID_NORMS}, got {mid_norm!r}")
        fk = {"device": device, "dtype": dtype}
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.depth_multiplier = depth_multiplier
        self.order = order
        self.mid_norm_kind = mid_norm
        self.mid_act_kind = mid_act
        m = depth_multiplier
        if spatial_first:
            mid = m * in_channels
            self.depthwise = nn.Conv2d(
                in_channels, mid, kernel_size, stride, padding, dilation,
                groups=in_channels, bias=False, padding_mode=padding_mode, **fk,
            )
            self.mid_norm = nn.BatchNorm2d(mid, **fk) if mid_norm else nn.Identity()
            self.mid_act = make_mid_act(mid_act)
            self.pointwise = nn.Conv2d(mid, out_channels, 1, bias=bias, **fk)
        else:
            mid = m * out_channels
            self.pointwise = nn.Conv2d(in_channels, mid, 1, bias=False, **fk)
            self.mid_norm = nn.BatchNorm2d(mid, **fk) if mid_norm else nn.Identity()
            self.mid_act = make_mid_act(mid_act)
            self.depthwise = nn.Conv2d(
                mid, out_channels, kernel_size, stride, padding, dilation,
                groups=out_channels, bias=bias, padding_mode=padding_mode, **fk,
            )

    # --- the questions code asks a conv -------------------------------------------------
    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.depthwise.kernel_size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.depthwise.stride

    @property
    def padding(self) -> Union[str, tuple[int, ...]]:
        return self.depthwise.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.depthwise.dilation

    @property
    def padding_mode(self) -> str:
        return self.depthwise.padding_mode

    @property
    def bias(self) -> Optional[Tensor]:
        """The bias of the last stage (``None`` when the block has none)."""
        return self.last_stage.bias

    @property
    def _spatial_first(self) -> bool:
        # a property, not an attribute: blocks pickled by earlier versions have only ``order``
        return layout_of(self.order) is PER_INPUT

    @property
    def first_stage(self) -> nn.Conv2d:
        """The stage that runs first (``depthwise`` for ``dw_pw``, ``pointwise`` for ``pw_dw``)."""
        return self.depthwise if self._spatial_first else self.pointwise

    @property
    def last_stage(self) -> nn.Conv2d:
        """The stage that runs last and holds the bias."""
        return self.pointwise if self._spatial_first else self.depthwise

    @property
    def is_linear(self) -> bool:
        """True when no norm or activation sits between the stages."""
        return self.mid_norm_kind is None and self.mid_act_kind is None

    def forward(self, x: Tensor) -> Tensor:
        return self.last_stage(self.mid_act(self.mid_norm(self.first_stage(x))))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"order={self.order!r}, depth_multiplier={self.depth_multiplier}"
        )

    # --- construction from a dense conv -------------------------------------------------
    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        depth_multiplier: int = 1,
        order: str = "dw_pw",
        init: str = "svd",
        mid_norm: Optional[str] = None,
        mid_act: Optional[str] = None,
        name: str = "",
    ) -> "DepthwiseSeparableConv2d":
        """Build the separable block from a dense ``nn.Conv2d``, on its device and dtype.

        ``init="svd"`` sets the stages from the best rank-``m`` factorisation of the
        kernel (exact at ``m = kh·kw`` when the block is linear); ``init="random"``
        keeps PyTorch's default initialisation. The bias is copied either way.
        requires_grad and train/eval mode follow the dense conv. ``name`` (the
        module's qualified name) only improves error messages.

        Raises:
            UnsupportedConvError: grouped, 1×1, non-``Conv2d`` or subclass-with-own-forward
                convs, and convs on the meta device with ``init="svd"``.

        Example:
            >>> dense = nn.Conv2d(64, 128, 3, bias=False)
            >>> sep = DepthwiseSeparableConv2d.from_conv(dense, order="pw_dw")
            >>> sep.depthwise.groups, sep.pointwise.out_channels
            (128, 128)
        """
        check_convertible(conv, name=name)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        w = conv.weight
        if init == "svd" and w.device.type == "meta":
            where = f" at {name!r}" if name else ""
            raise UnsupportedConvError(
                f"conv{where} lives on the meta device: it has no weights to factorise. "
                "Hint: materialise the model (load its weights) first, or use init='random'."
            )
        block = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=w.device, dtype=w.dtype, depth_multiplier=depth_multiplier, order=order,
            mid_norm=mid_norm, mid_act=mid_act,
        )
        with torch.no_grad():
            if init == "svd":
                _factorize_into(block, w.detach(), depth_multiplier, layout_of(order))
            if conv.bias is not None:
                block.bias.copy_(conv.bias.detach())  # type: ignore[union-attr]
        for p in block.parameters():
            p.requires_grad_(w.requires_grad)
        block.train(conv.training)
        return block


#: Float64 bytes of kernel slices factorised per SVD call: bounds the transient memory of ``from_conv``.
SVD_CHUNK_BYTES = 4 * 2**20


def _factorize_into(block: DepthwiseSeparableConv2d, w: Tensor, m: int, layout: SliceLayout,
                    chunk_bytes: int = SVD_CHUNK_BYTES) -> None:
    """Set the block's stages from the SVD of ``w``, a chunk of kernel slices at a time.

    Every slice's SVD is independent of the others (one per input channel for
    ``dw_pw``, per output filter for ``pw_dw``), and each chunk's results occupy a
    contiguous range of the stages' weights, so chunking gives the same numbers as
    one batched call while the float64 workspace stays near ``chunk_bytes`` (one
    call on a 512×512 3×3 kernel peaks near 9× the kernel's float32 size).
    """
    c_out, c_in, kh, kw = w.shape
    batch, other = (c_in, c_out) if layout is PER_INPUT else (c_out, c_in)
    step = max(1, chunk_bytes // max(1, other * kh * kw * 8))
    dw, pw = block.depthwise.weight, block.pointwise.weight
    for b0 in range(0, batch, step):
        b1 = min(batch, b0 + step)
        if layout is PER_INPUT:  # slices = input channels: depthwise rows and pointwise columns c*m + j
            spatial, pointwise = factorize(w[:, b0:b1], m, layout)
            dw[b0 * m:b1 * m].copy_(spatial)
            pw[:, b0 * m:b1 * m].copy_(pointwise)
        else:  # slices = output filters: pointwise rows o*m + j and depthwise rows o
            spatial, pointwise = factorize(w[b0:b1], m, layout)
            pw[b0 * m:b1 * m].copy_(pointwise)
            dw[b0:b1].copy_(spatial)


def check_convertible(conv: nn.Module, *, name: str = "") -> None:
    """Raise :class:`UnsupportedConvError` unless ``conv`` is a dense, plain ``nn.Conv2d`` with k×k > 1.

    Example:
        >>> check_convertible(nn.Conv2d(8, 8, 3))
        >>> check_convertible(nn.Conv2d(8, 8, 3, groups=8))
        Traceback (most recent call last):
        ...
        dsrewrite.errors.UnsupportedConvError: conv is grouped (groups=8): only dense convs (groups=1) can be factorised. Hint: exclude it in the recipe (select.groups: [1]).
    """
    where = f" {name!r}" if name else ""
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedConvError(
            f"module{where} is a {type(conv).__name__}, not an nn.Conv2d: only 2-d convs can be "
            "factorised. Hint: select only Conv2d modules."
        )
    own_forward = type(conv).forward is not nn.Conv2d.forward or (
        type(conv)._conv_forward is not nn.Conv2d._conv_forward
    )
    if own_forward:
        raise UnsupportedConvError(
            f"conv{where} is a {type(conv).__module__}.{type(conv).__qualname__}, a Conv2d subclass "
            "with its own forward (e.g. SAME padding or weight standardisation): swapping it as a "
            "plain conv would change the output. Hint: exclude it in the recipe."
        )
    if conv.groups != 1:
        raise UnsupportedConvError(
            f"conv{where} is grouped (groups={conv.groups}): only dense convs (groups=1) can be "
            "factorised. Hint: exclude it in the recipe (select.groups: [1])."
        )
    kh, kw = _pair(conv.kernel_size)
    if kh * kw == 1:
        raise UnsupportedConvError(
            f"conv{where} has a 1×1 kernel: it is already pointwise and has nothing to separate. "
            "Hint: select kernel sizes larger than 1×1."
        )
