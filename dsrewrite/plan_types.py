# SPDX-License-Identifier: Apache-2.0
"""Moved to :mod:`dsrewrite.planning.types`; this path re-exports it for one minor version."""

from __future__ import annotations

from .planning.types import (
    LayerConfig,
    PlanEntry,
    Plan,
    PLAN_FORMAT_VERSION,
)

__all__ = [
    "LayerConfig",
    "PlanEntry",
    "Plan",
    "PLAN_FORMAT_VERSION",
]
