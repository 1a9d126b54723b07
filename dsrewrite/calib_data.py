# SPDX-License-Identifier: Apache-2.0
"""Moved to :mod:`dsrewrite.refit.calib_data`; this path re-exports it for one minor version."""

from __future__ import annotations

from .refit.calib_data import (
    open_calibration,
    CalibrationData,
    ImageFolderDataset,
    example_inputs_for,
    PRESETS,
    IMAGE_SUFFIXES,
    ARRAY_SUFFIXES,
)

__all__ = [
    "open_calibration",
    "CalibrationData",
    "ImageFolderDataset",
    "example_inputs_for",
    "PRESETS",
    "IMAGE_SUFFIXES",
    "ARRAY_SUFFIXES",
]
