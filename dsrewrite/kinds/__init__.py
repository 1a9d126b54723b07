# SPDX-License-Identifier: Apache-2.0
"""Replacement kinds: the single extension point for "what replaces a conv".

A kind (:class:`ReplacementKind`) answers every question the data flow asks about one
kind of replacement: which convs it refuses and why, its MACs and parameters, its rank
for an energy target and its weight error, how to build the block, the block's stages
(for calibration, BN folding and healing), its least-squares layout for calibration
and whether the deployment hoist applies. Recipes (``order``), the recipe JSON Schema,
``dsrewrite --order``, plans (``LayerConfig.order`` holds the kind's name) and
``order: auto`` read the registry; the built-ins ``dw_pw`` and ``pw_dw`` are its first
two entries. Adding a kind: see docs/architecture.md, "Adding a replacement kind".

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dsrewrite.plan_types import LayerConfig
    >>> kind_names()
    ('dw_pw', 'pw_dw')
    >>> conv = nn.Conv2d(8, 16, 3, padding=1)
    >>> block = get_kind("pw_dw").build(conv, LayerConfig(order="pw_dw", depth_multiplier=9))
    >>> x = torch.randn(1, 8, 10, 10)
    >>> kind_of(block).name, torch.allclose(block(x), conv(x), atol=1e-5)
    ('pw_dw', True)
"""

from .dw_pw import DW_PW
from .protocol import KIND_MEMBERS, LAYOUT_MEMBERS, LstsqLayout, ReplacementKind, Stages, missing_members
from .pw_dw import PW_DW
from .registry import (
    RESERVED_NAMES,
    auto_kinds,
    get_kind,
    kind_names,
    kind_of,
    kinds,
    register_kind,
    unregister_kind,
)

__all__ = [
    "ReplacementKind",
    "LstsqLayout",
    "Stages",
    "KIND_MEMBERS",
    "LAYOUT_MEMBERS",
    "RESERVED_NAMES",
    "missing_members",
    "register_kind",
    "unregister_kind",
    "get_kind",
    "kind_names",
    "kinds",
    "kind_of",
    "auto_kinds",
]

# the built-ins, in this order: ``order: auto`` gives ties to the earlier one
for _kind in (DW_PW, PW_DW):
    register_kind(_kind)
del _kind
