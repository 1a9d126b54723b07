# SPDX-License-Identifier: Apache-2.0
"""Moved to :mod:`dsrewrite.planning.capture`; this path re-exports it for one minor version."""

from __future__ import annotations

from .runtime.tracer import timm_fx_extras
from .planning.capture import (
    capture,
    conv_base_class,
    is_plain_conv,
)
from ._shim import make_callable

make_callable(__name__, capture)  # dsrewrite.capture(...) keeps calling the function

__all__ = [
    "capture",
    "conv_base_class",
    "is_plain_conv",
    "timm_fx_extras",
]
