# SPDX-License-Identifier: Apache-2.0
"""Moved to :mod:`dsrewrite.planning.planner`; this path re-exports it for one minor version."""

from __future__ import annotations

from .planning.planner import (
    plan,
    plan_from_capture,
    resolve_config,
    separable_macs,
    NothingSelectedWarning,
    RecipeLike,
)

__all__ = [
    "plan",
    "plan_from_capture",
    "resolve_config",
    "separable_macs",
    "NothingSelectedWarning",
    "RecipeLike",
]
