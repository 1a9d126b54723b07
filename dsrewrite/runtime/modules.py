# SPDX-License-Identifier: Apache-2.0
"""Qualified module names and submodule replacement (every alias of a shared module too).

Example:
    >>> net = nn.Sequential(nn.Identity())
    >>> set_submodule(net, "0", nn.ReLU()); join("", "0"), type(net[0]).__name__
    ('0', 'ReLU')
"""

from __future__ import annotations

from torch import nn

__all__ = ["join", "module_aliases", "set_submodule"]


def join(prefix: str, name: str) -> str:
    """Qualified name of ``name`` under ``prefix`` (either may be empty).

    Example:
        >>> join("decoder", "conv1"), join("", "conv1"), join("decoder", "")
        ('decoder.conv1', 'conv1', 'decoder')
    """
    return f"{prefix}.{name}" if prefix and name else prefix or name


def module_aliases(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Map ``id(module)`` to every ``(parent, attribute)`` pair that holds it (shared modules too)."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None:
                pairs = out.setdefault(id(child), [])
                if not any(p is parent and a == attr for p, a in pairs):
                    pairs.append((parent, attr))
    return out


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` (and every alias of the same object) by ``new``.

    Example:
        >>> net = nn.Sequential(nn.Identity())
        >>> set_submodule(net, "0", nn.ReLU()); net
        Sequential(
          (0): ReLU()
        )
    """
    old = model.get_submodule(name)
    for parent, attr in module_aliases(model).get(id(old), []):
        setattr(parent, attr, new)
