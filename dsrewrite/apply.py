# SPDX-License-Identifier: Apache-2.0
"""Moved to :mod:`dsrewrite.planning.apply`; this path re-exports it for one minor version."""

from __future__ import annotations

from .runtime.modules import module_aliases, set_submodule
from .runtime.preflight import check_rewritable
from .errors import UnsupportedModelError
from .planning.apply import (
    apply_plan,
)

__all__ = [
    "apply_plan",
    "module_aliases",
    "set_submodule",
    "check_rewritable",
    "UnsupportedModelError",
]
