# SPDX-License-Identifier: Apache-2.0
"""Which replacement blocks calibration's least-squares refit covers, and which keep their SVD initialisation.

The refit's sampled positions and patches (:mod:`dsrewrite.refit.patches_nd`) and the
built-in kinds' least-squares layouts cover regular blocks of 1, 2 or 3 spatial dims (grouped
ones with a last-stage refit only); transposed blocks are left at their SVD initialisation,
and calibration says so in its notes.
"""

from __future__ import annotations

from torch import nn

from ..kinds import kind_of

__all__ = ["least_squares_ready", "not_refit"]


def least_squares_ready(block: nn.Module) -> bool:
    """Whether calibration's least-squares refit covers the block: regular (not transposed)."""
    return not getattr(block, "transposed", False)


def not_refit(rewritten: nn.Module) -> list[str]:
    """Replacement blocks calibration leaves at their SVD initialisation (transposed ones).

    Example:
        >>> from dsrewrite.kinds.separable_nd import SeparableConvNd
        >>> not_refit(nn.Sequential(SeparableConvNd.from_conv(nn.Conv3d(4, 4, 3)),
        ...                         SeparableConvNd.from_conv(nn.ConvTranspose3d(4, 4, 3))))
        ['1']
    """
    return [n for n, m in rewritten.named_modules() if kind_of(m) is not None and not least_squares_ready(m)]
