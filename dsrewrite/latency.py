# SPDX-License-Identifier: Apache-2.0
"""Moved to :mod:`dsrewrite.measure.latency`; this path re-exports it for one minor version."""

from __future__ import annotations

from .measure.latency import (
    LatencyComparison,
    compare_latency,
)

__all__ = [
    "LatencyComparison",
    "compare_latency",
]
