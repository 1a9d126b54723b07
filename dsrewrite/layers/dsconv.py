# SPDX-License-Identifier: Apache-2.0
"""Old import path of the separable block: it lives in :mod:`dsrewrite.kinds.separable`.

Example:
    >>> from dsrewrite.layers.dsconv import DepthwiseSeparableConv2d
    >>> DepthwiseSeparableConv2d.__module__
    'dsrewrite.kinds.separable'
"""

from ..kinds.separable import (
    INITS,
    MID_ACTS,
    MID_NORMS,
    SVD_CHUNK_BYTES,
    DepthwiseSeparableConv2d,
    check_convertible,
    make_mid_act,
)

__all__ = ["DepthwiseSeparableConv2d", "MID_NORMS", "MID_ACTS", "INITS", "make_mid_act", "check_convertible"]
