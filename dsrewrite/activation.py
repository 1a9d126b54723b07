# SPDX-License-Identifier: Apache-2.0
"""Moved to :mod:`dsrewrite.refit.activation`; this path re-exports it for one minor version."""

from __future__ import annotations

from .refit.activation import (
    FollowingReLU,
    following_relus,
)

__all__ = [
    "FollowingReLU",
    "following_relus",
]
