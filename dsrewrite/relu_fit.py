# SPDX-License-Identifier: Apache-2.0
"""Moved to :mod:`dsrewrite.refit.relu_fit`; this path re-exports it for one minor version."""

from __future__ import annotations

from .refit.relu_fit import (
    relu_aux_targets,
    predict,
    relu_error,
    fit_through_relu,
    refit_relu,
    cross_product,
    DEFAULT_LAMBDAS,
)

__all__ = [
    "relu_aux_targets",
    "predict",
    "relu_error",
    "fit_through_relu",
    "refit_relu",
    "cross_product",
    "DEFAULT_LAMBDAS",
]
