# SPDX-License-Identifier: Apache-2.0
"""What a replacement kind is: the questions the rest of dsrewrite asks about "what replaces a conv".

A kind is any object with the members of :class:`ReplacementKind` (a subclass is not
required; :func:`~dsrewrite.kinds.register_kind` checks the members by name). The
planner, apply, calibration, deployment and the hoist ask the kind of a plan entry
(``LayerConfig.order`` is its :attr:`~ReplacementKind.name`) or of a built block
(:func:`~dsrewrite.kinds.kind_of`); none of them compares kind names.

The block a kind builds exposes the replaced conv's hyperparameters as attributes
(``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation``,
``padding_mode``, ``bias``, ``depth_multiplier``): calibration checks them against the
original conv.

Calibration asks one more object per block, a :class:`LstsqLayout`: the block's
weights in the least-squares layouts of :mod:`dsrewrite.lstsq` and the refits of
its stages. The shapes are the kind's own business; calibration only needs them to
be consistent with each other:

* ``first``, ``last``: the two stages' weights, float64, any shapes;
* last-stage features: ``(P, D)`` shared by every output, or ``(P, G, D)`` with
  one small problem per output channel (``G = C_out``), as
  :class:`~dsrewrite.lstsq.GramStats` accepts them;
* ``pack_last(last, bias)``: ``(D+1, C_out)`` shared, or ``(G, D+1, 1)`` grouped,
  the layout :func:`~dsrewrite.lstsq.ridge_solve` returns for those features;
* joint refits (only when :attr:`LstsqLayout.joint_dim` is not ``None``): statistics
  of the flattened input patches ``(P, C_in·K)``; ``dense(first, last)`` gives the
  block's dense kernel ``(C_out, C_in, K)``.

Example:
    >>> from dsrewrite.kinds import get_kind
    >>> missing_members(get_kind("dw_pw"))
    ()
    >>> missing_members(object())[:3]
    ('name', 'description', 'auto')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

from torch import Tensor, nn

from ..facts import ConvFact
from ..refit.lstsq import GramStats
from ..planning.types import LayerConfig

__all__ = ["ReplacementKind", "LstsqLayout", "Stages", "KIND_MEMBERS", "LAYOUT_MEMBERS", "missing_members"]

LstsqWeights = tuple[Tensor, Tensor, Optional[Tensor]]


@dataclass(frozen=True)
class Stages:
    """Names (relative to the block) of a built block's stages.

    ``first`` runs first, ``last`` runs last and holds the bias, ``spatial`` is the
    k×k stage; ``mid_norm`` is the normalisation between them (``None``: none), which
    folds into ``first``.

    Example:
        >>> Stages(first="depthwise", last="pointwise", spatial="depthwise", mid_norm="mid_norm").last
        'pointwise'
    """

    first: str
    last: str
    spatial: str
    mid_norm: Optional[str] = None


@runtime_checkable
class LstsqLayout(Protocol):
    """One built block as calibration's least-squares problem (see the module doc for the layouts)."""

    #: True when nothing nonlinear sits between the stages.
    linear: bool
    #: Size of the joint system over the input patches, or ``None`` when the kind has no joint refit.
    joint_dim: Optional[int]
    #: Whether the fit through a following ReLU refits the first stage too (joint layers only).
    relu_refits_first: bool

    @property
    def last_stage(self) -> nn.Module:
        """The module whose input is the last stage's input (hooked in last-stage mode)."""

    def current(self) -> LstsqWeights:
        """``(first, last, bias)`` of the block now, float64."""

    def write(self, first: Tensor, last: Tensor, bias: Optional[Tensor]) -> None:
        """Copy ``(first, last, bias)`` into the block's parameters (a ``None`` bias is left alone)."""

    def last_features(self, z: Tensor, positions: Tensor) -> Tensor:
        """Last-stage features at output ``positions`` ``(P, 3)`` from the last stage's input ``z``."""

    def last_features_from_patches(self, patches: Tensor, first: Tensor) -> Tensor:
        """Last-stage features from flattened input patches ``(P, C_in·K)`` through a linear first stage."""

    def pack_last(self, last: Tensor, bias: Optional[Tensor]) -> Tensor:
        """Last stage and bias in the layout :func:`~dsrewrite.lstsq.ridge_solve` returns."""

    def unpack_last(self, w: Tensor, has_bias: bool) -> tuple[Tensor, Optional[Tensor]]:
        """Inverse of :meth:`pack_last` (bias ``None`` when ``has_bias`` is False)."""

    def dense(self, first: Tensor, last: Tensor) -> Tensor:
        """The dense kernel ``(C_out, C_in, K)`` of a linear block with these stages."""

    def refit_last(self, stats: GramStats, first: Tensor, *, bias: bool,
                   ridge: float) -> tuple[Tensor, Optional[Tensor]]:
        """Best last stage (and bias) given ``first``, from input-patch statistics."""

    def refit_first(self, stats: GramStats, last: Tensor, bias: Optional[Tensor], *, ridge: float) -> Tensor:
        """Best first stage given ``last`` and ``bias`` (kept), from input-patch statistics."""


@runtime_checkable
class ReplacementKind(Protocol):
    """One kind of replacement for a dense conv (``dw_pw``, ``pw_dw``, ...).

    Units: MACs and parameters are counts for one forward at the fact's recorded
    shapes (bias excluded from MACs, included in parameters); ``m`` is the kind's rank
    (the depth multiplier).
    """

    #: The value of ``order`` in recipes, plans, ``--order`` and reports.
    name: str
    #: One line for the JSON Schema, ``--help`` and the docs.
    description: str
    #: Whether ``order: auto`` considers this kind (ties go to the earlier registered kind).
    auto: bool
    #: ``None`` when the deployment hoist (:mod:`dsrewrite.hoist`, which rewrites
    #: ``DepthwiseSeparableConv2d``-shaped blocks) applies to this kind's blocks, else why it
    #: does not (shown in the hoist's record).
    hoist_refusal: Optional[str]

    def check(self, conv: nn.Module, *, name: str = "") -> None:
        """Raise :class:`~dsrewrite.errors.UnsupportedConvError` (why, and a hint) for a conv it refuses."""

    def macs(self, fact: ConvFact, m: int) -> int:
        """MACs of the block that would replace ``fact`` at rank ``m`` (``ValueError`` without shapes)."""

    def params(self, fact: ConvFact, m: int) -> int:
        """Parameters of that block (bias included; no ``mid_norm``)."""

    def rank_for_energy(self, weight: Tensor, energy: float) -> int:
        """Smallest rank keeping at least ``energy`` of the kernel's spectrum."""

    def weight_error(self, weight: Tensor, m: int) -> float:
        """``‖W − Ŵ‖_F / ‖W‖_F`` of the best rank-``m`` block."""

    def build(self, conv: nn.Module, config: LayerConfig, *, init: Optional[str] = None,
              name: str = "") -> nn.Module:
        """The block for ``conv`` (on its device and dtype, same train mode); ``init`` overrides ``config.init``."""

    def owns(self, module: nn.Module) -> bool:
        """Whether ``module`` is a block of this kind."""

    def stages(self, block: nn.Module) -> Optional[Stages]:
        """The block's stages, or ``None`` when its forward is not the one the kind built."""

    def fold_bn_into(self, block: nn.Module) -> Optional[str]:
        """The stage (relative name) a BatchNorm that follows the block folds into, or ``None``."""

    def layout(self, block: nn.Module) -> LstsqLayout:
        """The block as calibration's least-squares problem."""


def _members(proto: type) -> tuple[str, ...]:
    names = list(getattr(proto, "__annotations__", {}))
    names += [n for n, v in vars(proto).items()
              if not n.startswith("_") and (callable(v) or isinstance(v, property)) and n not in names]
    return tuple(names)


#: Member names a kind must have, in declaration order.
KIND_MEMBERS: tuple[str, ...] = _members(ReplacementKind)
#: Member names a calibration layout must have.
LAYOUT_MEMBERS: tuple[str, ...] = _members(LstsqLayout)


def missing_members(obj: Any, members: tuple[str, ...] = KIND_MEMBERS) -> tuple[str, ...]:
    """The names in ``members`` that ``obj`` lacks."""
    return tuple(n for n in members if not hasattr(obj, n))
