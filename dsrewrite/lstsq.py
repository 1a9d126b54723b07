# SPDX-License-Identifier: Apache-2.0
"""Moved to :mod:`dsrewrite.refit.lstsq`; this path re-exports it for one minor version."""

from __future__ import annotations

from .refit.lstsq import (
    sample_positions,
    explicit_padding,
    gather_patches,
    GramStats,
    gram_matrix,
    symmetric_gram,
    ridge_solve,
    quadratic_error,
    dense_dwpw,
    dense_pwdw,
    augment,
    block_error,
    refit_dwpw_pointwise,
    refit_dwpw_spatial,
    refit_pwdw_spatial,
    refit_pwdw_pointwise,
)

__all__ = [
    "sample_positions",
    "explicit_padding",
    "gather_patches",
    "GramStats",
    "gram_matrix",
    "symmetric_gram",
    "ridge_solve",
    "quadratic_error",
    "dense_dwpw",
    "dense_pwdw",
    "augment",
    "block_error",
    "refit_dwpw_pointwise",
    "refit_dwpw_spatial",
    "refit_pwdw_spatial",
    "refit_pwdw_pointwise",
]
