# SPDX-License-Identifier: Apache-2.0
"""Modules that dsrewrite puts into models.

Example:
    >>> from dsrewrite.layers import DepthwiseSeparableConv2d
    >>> DepthwiseSeparableConv2d(8, 16, 3).depthwise.groups
    8
"""

from .dsconv import DepthwiseSeparableConv2d, check_convertible

__all__ = ["DepthwiseSeparableConv2d", "check_convertible"]
