# SPDX-License-Identifier: Apache-2.0
"""Moved to :mod:`dsrewrite.deploy.hoist`; this path re-exports it for one minor version."""

from .deploy.hoist import HOIST_MODES, HoistInputError, HoistRecord, HoistResult, hoist_pointwise

__all__ = ["HOIST_MODES", "HoistRecord", "HoistResult", "HoistInputError", "hoist_pointwise"]
