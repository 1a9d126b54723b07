# SPDX-License-Identifier: Apache-2.0
"""Which replacement blocks calibration's least-squares refit covers, and which keep their initialisation.

The refit's sampled positions and patches (:mod:`dsrewrite.refit.patches_nd`, and for
transposed blocks :mod:`dsrewrite.refit.patches_transposed`) and the built-in kinds'
least-squares layouts cover every block the built-in kinds build: regular and transposed
blocks of 1, 2 or 3 spatial dims, dense ones with joint refits, grouped ones with a last-stage
refit only. A block whose kind's ``layout()`` refuses it (``UnsupportedConvError``; a
third-party kind may) keeps its initialisation, and calibration says so in its notes.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedConvError
from ..kinds import kind_of

__all__ = ["least_squares_ready", "not_refit"]


def least_squares_ready(block: nn.Module) -> bool:
    """Whether calibration's least-squares refit covers the block: its kind gives it a layout.

    Example:
        >>> from dsrewrite.kinds.separable_nd import SeparableConvNd
        >>> least_squares_ready(SeparableConvNd.from_conv(nn.ConvTranspose2d(4, 4, 4, 2, 1)))
        True
    """
    kind = kind_of(block)
    if kind is None:
        return False
    try:
        kind.layout(block)
    except UnsupportedConvError:
        return False
    return True


def not_refit(rewritten: nn.Module) -> list[str]:
    """Replacement blocks calibration leaves at their initialisation (their kind gives no layout).

    Example:
        >>> from dsrewrite.kinds.separable_nd import SeparableConvNd
        >>> not_refit(nn.Sequential(SeparableConvNd.from_conv(nn.Conv3d(4, 4, 3)),
        ...                         SeparableConvNd.from_conv(nn.ConvTranspose3d(4, 4, 3))))
        []
    """
    return [n for n, m in rewritten.named_modules() if kind_of(m) is not None and not least_squares_ready(m)]
