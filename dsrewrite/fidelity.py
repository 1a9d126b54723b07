# SPDX-License-Identifier: Apache-2.0
"""Moved to :mod:`dsrewrite.measure.fidelity`; this path re-exports it for one minor version."""

from __future__ import annotations

from .runtime.run import flatten_outputs
from .measure.fidelity import (
    Fidelity,
    OutputFidelity,
    FidelityError,
    compare_outputs,
)

__all__ = [
    "Fidelity",
    "OutputFidelity",
    "FidelityError",
    "compare_outputs",
    "flatten_outputs",
]
