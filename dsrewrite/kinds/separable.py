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
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.modules.utils import _pair

from ..errors import UnsupportedConvError
from .separable_nd import INITS, MID_ACTS, MID_NORMS, SVD_CHUNK_BYTES, SeparableConvNd, make_mid_act

__all__ = [
    "DepthwiseSeparableConv2d",
    "MID_NORMS",
    "MID_ACTS",
    "INITS",
    "SVD_CHUNK_BYTES",
    "make_mid_act",
    "check_convertible",
]

_size_2 = Union[int, tuple[int, int]]


class DepthwiseSeparableConv2d(SeparableConvNd):
    """A dense k×k ``nn.Conv2d`` factored into a spatial (grouped) stage and a pointwise 1×1 stage.

    The 2-d, dense, regular case of :class:`~dsrewrite.kinds.separable_nd.SeparableConvNd`
    (its forward and properties); its own class so that files saved by earlier versions,
    which name it, reload. Arguments mirror :class:`torch.nn.Conv2d` (``groups`` excepted) plus:

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
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode,
                         device, dtype, spatial_dims=2, depth_multiplier=depth_multiplier, order=order,
                         mid_norm=mid_norm, mid_act=mid_act)

    @classmethod
    def _check(cls, conv: nn.Module, *, name: str) -> None:
        check_convertible(conv, name=name)

    @classmethod
    def _construct(cls, conv: Any, **kw: Any) -> "DepthwiseSeparableConv2d":
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation, **kw)

    @classmethod
    def from_conv(  # type: ignore[override]
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
        return super().from_conv(conv, depth_multiplier=depth_multiplier, order=order, init=init,
                                 mid_norm=mid_norm, mid_act=mid_act, name=name)


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
    if isinstance(conv, LazyModuleMixin) and conv.has_uninitialized_params():
        raise UnsupportedConvError(
            f"conv{where} is lazy ({type(conv).__name__}) and its parameters are not initialised: there is nothing "
            "to factorise, and dsrewrite does not materialise your module. Hint: run one forward pass first."
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
