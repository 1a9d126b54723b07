# SPDX-License-Identifier: Apache-2.0
"""Moved to :mod:`dsrewrite.refit.batches`; this path re-exports it for one minor version."""

from __future__ import annotations

from .refit.batches import (
    BatchError,
    InputSpec,
    input_spec,
    model_inputs,
    iter_inputs,
    batch_size_of,
    positional_count,
    to_device,
    check_iterable,
)

__all__ = [
    "BatchError",
    "InputSpec",
    "input_spec",
    "model_inputs",
    "iter_inputs",
    "batch_size_of",
    "positional_count",
    "to_device",
    "check_iterable",
]
