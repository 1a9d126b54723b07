"""Carry out a plan: swap the selected convs for DepthwiseSeparableConv2d blocks.

The model's own class comes back (never a GraphModule), with submodules
swapped; device, dtype and train/eval mode are kept. The caller's model is
copied first unless ``inplace=True``. Every entry is checked before anything
is changed, so a failing plan leaves the model as it was.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dsrewrite.plan_types import LayerConfig, Plan, PlanEntry
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3))
    >>> p = Plan((PlanEntry("1", "replace", "test", LayerConfig()),), recipe="x", capture="fx")
    >>> out = apply_plan(net, p)
    >>> type(out[1]).__name__, type(net[1]).__name__
    ('DepthwiseSeparableConv2d', 'Conv2d')
"""

from __future__ import annotations

import copy
from typing import Optional

from torch import nn

from .errors import DsRewriteError, PlanError, RewriteError
from .layers.dsconv import DepthwiseSeparableConv2d, check_convertible
from .plan_types import Plan

__all__ = ["apply_plan", "set_submodule", "module_aliases"]


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


def apply_plan(model: nn.Module, plan: Plan, *, inplace: bool = False, init: Optional[str] = None) -> nn.Module:
    """Return ``model`` with every ``replace`` entry of ``plan`` swapped in.

    ``init`` overrides each entry's init (``"random"`` is what reloading from a plan
    plus a state dict uses: the weights are loaded afterwards).

    Raises:
        PlanError: an entry names a module the model lacks, or one that is not a
            convertible conv (e.g. the plan was made for another architecture).
    """
    modules = dict(model.named_modules())
    for e in plan.replaced:
        if e.name not in modules:
            raise PlanError(
                f"plan entry {e.name!r} names no module of {type(model).__name__}. Hint: the plan was made "
                "for another architecture, or the model is wrapped (DataParallel adds 'module.')."
            )
        try:
            check_convertible(modules[e.name], name=e.name)
        except DsRewriteError as exc:
            raise PlanError(f"plan entry {e.name!r} cannot be applied: {exc}") from exc
        if e.config is None:
            raise PlanError(f"plan entry {e.name!r} is 'replace' but carries no config")
    target = model if inplace else copy.deepcopy(model)
    done: dict[int, nn.Module] = {}
    try:
        for e in plan.replaced:
            conv = target.get_submodule(e.name)
            if id(conv) in done:  # a shared module already swapped through another alias
                continue
            cfg = e.config
            assert cfg is not None  # checked above
            new = DepthwiseSeparableConv2d.from_conv(
                conv,  # type: ignore[arg-type]
                depth_multiplier=cfg.depth_multiplier,
                order=cfg.order,
                init=init or cfg.init,
                mid_norm=cfg.mid_norm,
                mid_act=cfg.mid_act,
                name=e.name,
            )
            set_submodule(target, e.name, new)
            done[id(conv)] = new
            done[id(new)] = new
    except DsRewriteError:
        raise
    except Exception as exc:  # pragma: no cover - unexpected torch failure
        raise RewriteError(f"swapping the convs failed: {type(exc).__name__}: {exc}") from exc
    return target
