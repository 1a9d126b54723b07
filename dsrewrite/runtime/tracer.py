# SPDX-License-Identifier: Apache-2.0
"""The fx tracing vocabulary shared by the graph readers: timm's leaves, and a leaf-keeping tracer base.

Example:
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    >>> [n.op for n in LeafTracer(leaf_types=(nn.Conv2d,)).trace(m).nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["LeafTracer", "timm_fx_extras", "CAT_FUNCS", "UPSAMPLE_FUNCS"]

#: The concatenations a graph reader treats as a skip join.
CAT_FUNCS = frozenset({torch.cat, torch.concat, torch.concatenate})

#: The functional upsamples a graph reader recognises, with the interpolation mode each fixes
#: (``None``: read its ``mode=`` argument).
UPSAMPLE_FUNCS: dict[Callable[..., Any], Optional[str]] = {
    F.interpolate: None,
    F.upsample: None,
    F.upsample_nearest: "nearest",
    F.upsample_bilinear: "bilinear",
    F.pixel_shuffle: "pixel_shuffle",
}


class LeafTracer(torch.fx.Tracer):
    """An fx tracer that keeps instances of ``leaf_types`` and the modules in ``leaf_ids`` as leaves.

    ``autowrap_functions`` are recorded as calls instead of traced through (timm
    registers its own; see :func:`timm_fx_extras`).
    """

    def __init__(self, leaf_types: Iterable[type] = (), autowrap_functions: Iterable[Callable[..., Any]] = (),
                 leaf_ids: Iterable[int] = ()) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.leaf_types = tuple(leaf_types)
        self.leaf_ids = set(leaf_ids)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if (self.leaf_types and isinstance(m, self.leaf_types)) or id(m) in self.leaf_ids:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def timm_fx_extras(model: nn.Module) -> tuple[tuple[type, ...], tuple[Callable[..., Any], ...]]:
    """timm's registered fx leaf modules and autowrap functions, when the model uses timm.

    Returns two empty tuples when timm is neither imported yet nor used by the model
    (timm is then not imported at all); once timm is imported, its registered extras.

    Example:
        >>> from timm.layers import Conv2dSame
        >>> leaves, funcs = timm_fx_extras(nn.Conv2d(3, 3, 3))
        >>> Conv2dSame in leaves and len(funcs) > 0
        True
    """
    if "timm" not in sys.modules and not any(
        type(m).__module__.startswith("timm.") for m in model.modules()
    ):
        return (), ()
    try:
        import timm  # noqa: F401  (importing timm.models registers every leaf)
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return (), ()
    leaves = tuple(m for m in get_notrace_modules() if isinstance(m, type))
    funcs = tuple(f for f in get_notrace_functions() if callable(f))
    return leaves, funcs
