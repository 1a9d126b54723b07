"""Moved to :mod:`dsrewrite.planning.capture`; this path re-exports it for one minor version."""

from __future__ import annotations

from .runtime.tracer import timm_fx_extras
from .planning.capture import (
    capture,
    conv_base_class,
    is_plain_conv,
)

__all__ = [
    "capture",
    "conv_base_class",
    "is_plain_conv",
    "timm_fx_extras",
]
