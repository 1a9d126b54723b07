# SPDX-License-Identifier: Apache-2.0
"""Whether a rewritten model can be written as a full module, known before the rewrite runs.

``torch.save`` refuses modules parametrized with :mod:`torch.nn.utils.parametrize`
(e.g. the new-style ``spectral_norm``/``weight_norm``): "Serialization of parametrized
modules is only supported through state_dict()". A replaced conv loses its
parametrization (the block holds the folded weight), but any other parametrized module
the recipe keeps would make the full-module output fail at the very end.
:func:`check_saveable` says so first, and offers the output that works: the weights and
the plan (``--save-format safetensors``; from Python, ``save_rewrite(...,
save_format="safetensors")`` or the ``state_dict()`` and the plan), reloaded with
``load_rewrite`` on a fresh instance of the architecture.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(2, 2)))
    >>> parametrized_modules(net)
    ['0']
    >>> check_saveable(net, "safetensors")
    >>> check_saveable(net, "torch")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dsrewrite.errors.OutputError: the rewritten model keeps 1 parametrized module ('0', Linear; ...), and torch cannot save ...
"""

from __future__ import annotations

from typing import Collection

from torch import nn
from torch.nn.utils import parametrize

from ..errors import OutputError

__all__ = ["parametrized_modules", "check_saveable"]


def parametrized_modules(model: nn.Module, *, replaced: Collection[str] = ()) -> list[str]:
    """Qualified names of the modules of ``model`` that carry a parametrization, except ``replaced`` ones."""
    return [n or "(root)" for n, m in model.named_modules()
            if parametrize.is_parametrized(m) and n not in replaced]


def check_saveable(model: nn.Module, save_format: str, *, replaced: Collection[str] = ()) -> None:
    """Raise :class:`OutputError` when ``save_format="torch"`` cannot write ``model`` (with ``replaced`` swapped).

    ``replaced`` names the convs the plan swaps (their parametrizations are folded);
    every other parametrized module stays and cannot be pickled.
    """
    if save_format != "torch":
        return
    left = parametrized_modules(model, replaced=replaced)
    if not left:
        return
    modules = dict(model.named_modules())
    first = left[0]
    cls = type(modules.get("" if first == "(root)" else first)).__mro__[1].__name__  # ParametrizedX -> X
    more = f" and {len(left) - 1} more" if len(left) > 1 else ""
    raise OutputError(
        f"the rewritten model keeps {len(left)} parametrized module{'s' if len(left) > 1 else ''} "
        f"({first!r}, {cls}{more}; torch.nn.utils.parametrize), and torch cannot save a parametrized module "
        "as a full module. Write the weights and the plan instead: --save-format safetensors with a "
        ".safetensors output (from Python: save_rewrite(..., save_format='safetensors'), or the state_dict() "
        "and the plan), and reload with load_rewrite on a fresh instance of the architecture."
    )
