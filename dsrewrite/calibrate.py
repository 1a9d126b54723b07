# SPDX-License-Identifier: Apache-2.0
"""Moved to :mod:`dsrewrite.refit.calibrate`; this path re-exports it for one minor version."""

from __future__ import annotations

from .refit.calibrate import (
    calibrate,
    CalibrationResult,
    LayerCalibration,
    CalibrationUsageError,
    replaced_names,
    check_options,
)
from ._shim import make_callable

make_callable(__name__, calibrate)  # dsrewrite.calibrate(...) keeps calling the function

__all__ = [
    "calibrate",
    "CalibrationResult",
    "LayerCalibration",
    "CalibrationUsageError",
    "replaced_names",
    "check_options",
]
