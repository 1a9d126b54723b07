# SPDX-License-Identifier: Apache-2.0
"""SeparableConvNd: a 1-, 2- or 3-d, dense or grouped, regular or transposed conv as two stages.

The block the built-in kinds (``dw_pw``, ``pw_dw``) put in place of any conv other than a
dense ``nn.Conv2d`` (that one keeps :class:`~dsrewrite.kinds.separable.DepthwiseSeparableConv2d`,
a subclass, so files saved by earlier versions reload). The stages:

* ``depthwise``: the spatial stage, one filter per channel (``groups`` = its input
  channels for ``dw_pw``, its output channels for ``pw_dw``): ``nn.ConvNd``, or
  ``nn.ConvTransposeNd`` for a transposed conv. Stride, padding (ints, tuples,
  ``'same'``/``'valid'``), ``output_padding``, dilation and ``padding_mode`` live here.
* ``pointwise``: a 1×…×1 ``nn.ConvNd`` with the conv's ``groups``.
* ``mid_norm`` / ``mid_act``: optional, between the stages; the bias is on the stage that
  runs last.

Exact at ``m = ∏k`` (SVD of the kernel cut per input channel for ``dw_pw``, per output
filter for ``pw_dw``; :mod:`dsrewrite.factorize`), the best rank-``m`` block below it.
A transposed conv's kernel ``(C_in, C_out/groups, *k)`` is first put in the regular
layout ``(C_out, C_in/groups, *k)`` (:func:`standard_kernel`); a transposed conv is
linear in its kernel, so the same factorisation is exact for it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
    >>> sep = SeparableConvNd.from_conv(up, depth_multiplier=16, order="pw_dw")
    >>> x = torch.randn(1, 8, 5, 5)
    >>> sep(x).shape, torch.allclose(sep(x), up(x), atol=1e-5)
    (torch.Size([1, 4, 10, 10]), True)
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin

from ..errors import UnsupportedConvError
from ..factorize import PER_INPUT, SliceLayout, factorize, layout_of

__all__ = [
    "SeparableConvNd",
    "MID_NORMS",
    "MID_ACTS",
    "INITS",
    "CONV_TYPES",
    "make_mid_act",
    "check_separable",
    "standard_kernel",
    "dense_kernel",
    "SVD_CHUNK_BYTES",
]

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

_CONV: dict[int, type[_ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T: dict[int, type[_ConvNd]] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
#: The torch conv classes a separable block can replace.
CONV_TYPES: tuple[type[_ConvNd], ...] = (*_CONV.values(), *_CONV_T.values())


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


def _prod(values: Any) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def standard_kernel(conv: _ConvNd) -> Tensor:
    """The kernel in the regular conv layout ``(C_out, C_in/groups, *k)`` (transposed convs re-laid).

    Example:
        >>> standard_kernel(nn.ConvTranspose1d(6, 4, 3, groups=2)).shape
        torch.Size([4, 3, 3])
    """
    w = conv.weight
    if not conv.transposed:
        return w
    g = conv.groups
    c_in, c_out_g = w.shape[:2]
    k = tuple(w.shape[2:])
    return w.reshape(g, c_in // g, c_out_g, *k).transpose(1, 2).reshape(g * c_out_g, c_in // g, *k)


def dense_kernel(conv: _ConvNd) -> Tensor:
    """The equivalent dense kernel ``(C_out, C_in, *k)``: block-diagonal over the groups.

    Its per-input and per-output slices have the singular values of the grouped ones
    (the added entries are zero), so spectra, energy ranks and weight errors read it.
    A plain dense regular conv's own weight comes back unchanged.

    Example:
        >>> dense_kernel(nn.Conv3d(4, 6, 3, groups=2)).shape
        torch.Size([6, 4, 3, 3, 3])
    """
    w = standard_kernel(conv)
    g = conv.groups
    if g == 1:
        return w
    c_out, c_in_g = w.shape[:2]
    c_out_g = c_out // g
    out = w.new_zeros(c_out, c_in_g * g, *w.shape[2:])
    for i in range(g):
        out[i * c_out_g:(i + 1) * c_out_g, i * c_in_g:(i + 1) * c_in_g] = w[i * c_out_g:(i + 1) * c_out_g]
    return out


def check_separable(conv: nn.Module, *, name: str = "") -> None:
    """Raise :class:`UnsupportedConvError` unless a separable block can represent ``conv``.

    Accepted: plain ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` (torch's own
    forward), ``groups`` from 1 up to (not including) a depthwise conv, kernel larger than
    1 in some dim, weights materialised (not lazy).

    Example:
        >>> check_separable(nn.Conv3d(8, 8, 3, groups=2))
        >>> check_separable(nn.Conv1d(8, 8, 3, groups=8))
        Traceback (most recent call last):
        ...
        dsrewrite.errors.UnsupportedConvError: conv is depthwise (groups=8 = in_channels): it is already separable. Hint: exclude it in the recipe (select.groups: [1]).
    """
    where = f" {name!r}" if name else ""
    base = next((t for t in CONV_TYPES if isinstance(conv, t)), None)
    if base is None:
        raise UnsupportedConvError(
            f"module{where} is a {type(conv).__name__}, not a torch conv ({', '.join(t.__name__ for t in CONV_TYPES)}). "
            "Hint: select only conv modules."
        )
    if type(conv).forward is not base.forward or getattr(type(conv), "_conv_forward", None) is not getattr(
            base, "_conv_forward", None):
        raise UnsupportedConvError(
            f"conv{where} is a {type(conv).__module__}.{type(conv).__qualname__}, a {base.__name__} subclass "
            "with its own forward (e.g. SAME padding or weight standardisation): swapping it as a "
            "plain conv would change the output. Hint: exclude it in the recipe."
        )
    if isinstance(conv, LazyModuleMixin) and conv.has_uninitialized_params():  # reads no weight: a parametrized
        raise UnsupportedConvError(  # weight read here would run its parametrization (a power iteration in train)
            f"conv{where} is lazy ({type(conv).__name__}) and its parameters are not initialised: there is nothing "
            "to factorise, and dsrewrite does not materialise your module. Hint: run one forward pass first."
        )
    g = conv.groups
    if g > 1 and g == conv.in_channels:
        raise UnsupportedConvError(
            f"conv{where} is depthwise (groups={g} = in_channels): it is already separable. "
            "Hint: exclude it in the recipe (select.groups: [1])."
        )
    if _prod(conv.kernel_size) == 1:
        raise UnsupportedConvError(
            f"conv{where} has a {'×'.join(map(str, conv.kernel_size))} kernel: it is already pointwise and has "
            "nothing to separate. Hint: select kernel sizes larger than 1."
        )


def _check_nd(value: int, what: str, options: tuple[int, ...]) -> int:
    if value not in options:
        raise ValueError(f"{what} must be one of {options}, got {value!r}")
    return value


class SeparableConvNd(nn.Module):
    """A conv (1/2/3-d, dense or grouped, regular or transposed) factored into a spatial and a pointwise stage.

    Arguments mirror the torch conv (``padding_mode`` only for regular convs,
    ``output_padding`` only for transposed ones) plus:

    Args:
        spatial_dims: 1, 2 or 3.
        groups: the conv's groups (1 dense; ``1 < groups < in_channels`` grouped): the
            pointwise stage keeps them.
        transposed: the spatial stage is a depthwise ``ConvTransposeNd``.
        depth_multiplier: ``m ≥ 1``: ``dw_pw`` maps ``C_in → m·C_in`` in the spatial
            stage; ``pw_dw`` maps ``C_in → m·C_out`` in the pointwise stage. Exact at
            ``m = ∏k``.
        order: ``"dw_pw"`` or ``"pw_dw"``.
        mid_norm: ``None`` or ``"batchnorm"`` (BatchNorm1d/2d/3d between the stages).
        mid_act: ``None`` or an activation name between the stages.

    Shapes: input ``(N, C_in, *spatial)``, output as the conv's. ``forward`` takes
    ``output_size`` like ``ConvTransposeNd.forward`` (transposed blocks only).

    Example:
        >>> m = SeparableConvNd(8, 16, 3, padding="same", spatial_dims=3, groups=2, order="pw_dw")
        >>> m(torch.randn(1, 8, 5, 6, 7)).shape
        torch.Size([1, 16, 5, 6, 7])
    """

    #: defaults for blocks pickled before these attributes existed (2-d dense regular ones)
    spatial_dims: int = 2
    groups: int = 1
    transposed: bool = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        spatial_dims: int = 2,
        groups: int = 1,
        transposed: bool = False,
        output_padding: Any = 0,
        depth_multiplier: int = 1,
        order: str = "dw_pw",
        mid_norm: Optional[str] = None,
        mid_act: Optional[str] = None,
    ) -> None:
        super().__init__()
        spatial_first = layout_of(order) is PER_INPUT  # ValueError for an order this module cannot hold
        d = _check_nd(spatial_dims, "spatial_dims", (1, 2, 3))
        if not isinstance(depth_multiplier, int) or depth_multiplier < 1:
            raise ValueError(f"depth_multiplier must be an int >= 1, got {depth_multiplier!r}")
        if mid_norm is not None and mid_norm not in MID_NORMS:
            raise ValueError(f"mid_norm must be None or one of {MID_NORMS}, got {mid_norm!r}")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if transposed and padding_mode != "zeros":
            raise ValueError(f"transposed convs only support padding_mode='zeros', got {padding_mode!r}")
        fk = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.spatial_dims, self.groups, self.transposed = d, int(groups), bool(transposed)
        self.depth_multiplier = depth_multiplier
        self.order = order
        self.mid_norm_kind, self.mid_act_kind = mid_norm, mid_act
        m = depth_multiplier
        conv = _CONV[d]

        def spatial(cin: int, cout: int, g: int, with_bias: bool) -> nn.Module:
            if transposed:
                return _CONV_T[d](cin, cout, kernel_size, stride, padding, output_padding, groups=g,
                                  bias=with_bias, dilation=dilation, **fk)
            return conv(cin, cout, kernel_size, stride, padding, dilation, groups=g, bias=with_bias,
                        padding_mode=padding_mode, **fk)

        mid = m * (in_channels if spatial_first else out_channels)
        if spatial_first:
            self.depthwise = spatial(in_channels, mid, in_channels, False)
            self.mid_norm = _BN[d](mid, **fk) if mid_norm else nn.Identity()
            self.mid_act = make_mid_act(mid_act)
            self.pointwise = conv(mid, out_channels, 1, groups=groups, bias=bias, **fk)
        else:
            self.pointwise = conv(in_channels, mid, 1, groups=groups, bias=False, **fk)
            self.mid_norm = _BN[d](mid, **fk) if mid_norm else nn.Identity()
            self.mid_act = make_mid_act(mid_act)
            self.depthwise = spatial(mid, out_channels, out_channels, bias)

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
    def output_padding(self) -> tuple[int, ...]:
        return self.depthwise.output_padding

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
    def first_stage(self) -> nn.Module:
        """The stage that runs first (``depthwise`` for ``dw_pw``, ``pointwise`` for ``pw_dw``)."""
        return self.depthwise if self._spatial_first else self.pointwise

    @property
    def last_stage(self) -> nn.Module:
        """The stage that runs last and holds the bias."""
        return self.pointwise if self._spatial_first else self.depthwise

    @property
    def is_linear(self) -> bool:
        """True when no norm or activation sits between the stages."""
        return self.mid_norm_kind is None and self.mid_act_kind is None

    def forward(self, x: Tensor, output_size: Optional[list[int]] = None) -> Tensor:
        if output_size is None:
            return self.last_stage(self.mid_act(self.mid_norm(self.first_stage(x))))
        if not self.transposed:
            raise TypeError("output_size is only accepted by a transposed block")
        if self._spatial_first:
            return self.pointwise(self.mid_act(self.mid_norm(self.depthwise(x, output_size))))
        return self.depthwise(self.mid_act(self.mid_norm(self.pointwise(x))), output_size)

    def extra_repr(self) -> str:
        extra = f", groups={self.groups}" if self.groups != 1 else ""
        if self.transposed:
            extra += f", transposed=True, output_padding={self.output_padding}"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}{extra}, "
            f"order={self.order!r}, depth_multiplier={self.depth_multiplier}"
        )

    # --- construction from a conv ---------------------------------------------------------
    @classmethod
    def _check(cls, conv: nn.Module, *, name: str) -> None:
        check_separable(conv, name=name)

    @classmethod
    def _construct(cls, conv: _ConvNd, **kw: Any) -> "SeparableConvNd":
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation, spatial_dims=len(conv.kernel_size), groups=conv.groups,
                   transposed=conv.transposed, output_padding=conv.output_padding, **kw)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        *,
        depth_multiplier: int = 1,
        order: str = "dw_pw",
        init: str = "svd",
        mid_norm: Optional[str] = None,
        mid_act: Optional[str] = None,
        name: str = "",
    ) -> Any:
        """Build the separable block from a conv, on its device and dtype.

        ``init="svd"`` sets the stages from the best rank-``m`` factorisation of the
        kernel (exact at ``m = ∏k`` when the block is linear); ``init="random"`` keeps
        PyTorch's default initialisation. The bias is copied either way; requires_grad
        and train/eval mode follow the conv. ``name`` only improves error messages.

        Raises:
            UnsupportedConvError: what :func:`check_separable` (or the subclass) refuses,
                and convs on the meta device with ``init="svd"``.
        """
        cls._check(conv, name=name)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        w = conv.weight
        if init == "svd" and w.device.type == "meta":
            where = f" at {name!r}" if name else ""
            raise UnsupportedConvError(
                f"conv{where} lives on the meta device: it has no weights to factorise. "
                "Hint: materialise the model (load its weights) first, or use init='random'."
            )
        block = cls._construct(
            conv, bias=conv.bias is not None, padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype,
            depth_multiplier=depth_multiplier, order=order, mid_norm=mid_norm, mid_act=mid_act,
        )
        with torch.no_grad():
            if init == "svd":
                _factorize_into(block, standard_kernel(conv).detach(), depth_multiplier, layout_of(order))
            if conv.bias is not None:
                block.bias.copy_(conv.bias.detach())  # type: ignore[union-attr]
        for p in block.parameters():
            p.requires_grad_(w.requires_grad)
        block.train(conv.training)
        return block


#: Float64 bytes of kernel slices factorised per SVD call: bounds the transient memory of ``from_conv``.
SVD_CHUNK_BYTES = 4 * 2**20


def _factorize_into(block: SeparableConvNd, w: Tensor, m: int, layout: SliceLayout,
                    chunk_bytes: int = SVD_CHUNK_BYTES) -> None:
    """Set the block's stages from the SVD of ``w`` (regular layout ``(C_out, C_in/g, *k)``), a chunk at a time.

    Every slice's SVD is independent of the others (one per input channel for
    ``dw_pw``, per output filter for ``pw_dw``); a chunk is whole groups (or a run of
    slices inside one group), so its results occupy contiguous ranges of the stages'
    weights, and chunking gives the numbers of one batched call while the float64
    workspace stays near ``chunk_bytes``.
    """
    g = block.groups
    c_out, c_in_g = w.shape[:2]
    c_out_g, k = c_out // g, _prod(w.shape[2:])
    dw = block.depthwise.weight.view(-1, *w.shape[2:])  # rows: channel c*m + j (dw_pw) or o*m + j (pw_dw)
    pw = block.pointwise.weight
    if layout is PER_INPUT:
        step = max(1, chunk_bytes // max(1, c_out_g * k * 8))
        for gi in range(g):
            rows = slice(gi * c_out_g, (gi + 1) * c_out_g)
            for c0 in range(0, c_in_g, step):
                c1 = min(c_in_g, c0 + step)
                spatial, pointwise = factorize(w[rows, c0:c1], m, layout)
                base = gi * c_in_g
                dw[(base + c0) * m:(base + c1) * m].copy_(spatial.reshape(-1, *w.shape[2:]))
                pw[rows, c0 * m:c1 * m].copy_(pointwise)
    else:
        step = max(1, chunk_bytes // max(1, c_in_g * k * 8))
        for o0 in range(0, c_out, step):
            o1 = min(c_out, o0 + step)
            spatial, pointwise = factorize(w[o0:o1], m, layout)
            pw[o0 * m:o1 * m].copy_(pointwise)
            dw[o0 * m:o1 * m].copy_(spatial.reshape(-1, *w.shape[2:]))
