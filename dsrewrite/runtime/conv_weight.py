# SPDX-License-Identifier: Apache-2.0
"""Reading a conv's weight and bias as its forward uses them, without side effects.

A conv's ``weight`` is not always a plain parameter:

* **parametrized** (:mod:`torch.nn.utils.parametrize`, e.g. the new-style
  ``torch.nn.utils.parametrizations.spectral_norm``/``weight_norm``): ``conv.weight`` is
  computed on every read, and spectral norm in train mode runs a power iteration that
  writes the module's ``_u``/``_v`` buffers. It is read here in eval mode, under
  ``no_grad`` and ``parametrize.cached()``: the eval-mode weight, nothing written;
* **hook-based norms** (the old ``torch.nn.utils.weight_norm``/``spectral_norm``): a
  forward pre-hook sets ``conv.weight`` from ``weight_g``/``weight_v`` (or ``weight_orig``
  and the ``_u``/``_v`` buffers) before each call, so the attribute may be stale. It is
  computed here from those tensors with the hook's own ``compute_weight`` (spectral
  norm without a power iteration, as in eval mode).

:func:`plain_view` gives a plain ``nn.Conv2d`` holding those tensors, which is what a
replacement kind is built from. The caller's module is never changed.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> conv = nn.utils.parametrizations.spectral_norm(nn.Conv2d(4, 4, 3)).train()
    >>> u = conv.parametrizations.weight[0]._u.clone()
    >>> view = plain_view(conv)
    >>> type(view).__name__, torch.equal(u, conv.parametrizations.weight[0]._u)
    ('Conv2d', True)
    >>> weight_norm_kind(conv)
    'parametrized (_SpectralNorm)'
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from .run import evaluating

__all__ = ["norm_hooks", "weight_norm_kind", "effective_tensor", "plain_view", "raw_weight", "leaf_memo"]


def _norm_hook_types() -> tuple[type, ...]:
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return (WeightNorm, SpectralNorm)


def norm_hooks(module: nn.Module) -> list[Any]:
    """The old hook-based ``weight_norm``/``spectral_norm`` objects among ``module``'s forward pre-hooks.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     c = nn.utils.weight_norm(nn.Conv2d(2, 2, 3))
        >>> [type(h).__name__ for h in norm_hooks(c)]
        ['WeightNorm']
    """
    types = _norm_hook_types()
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, types)]


def weight_norm_kind(module: nn.Module) -> Optional[str]:
    """How ``module``'s weight is computed when it is not a plain parameter, in words; ``None`` for a plain one."""
    if parametrize.is_parametrized(module):
        names = sorted({type(p).__name__ for plist in module.parametrizations.values() for p in plist})
        return f"parametrized ({', '.join(names)})"
    hooks = norm_hooks(module)
    if hooks:
        return "hook-based " + ", ".join(sorted({type(h).__name__ for h in hooks}))
    return None


def effective_tensor(module: nn.Module, name: str = "weight") -> Optional[Tensor]:
    """``module.<name>`` as its forward (in eval mode) uses it, detached, computed without side effects.

    Example:
        >>> c = nn.utils.parametrizations.weight_norm(nn.Conv2d(2, 3, 3))
        >>> torch.allclose(effective_tensor(c), c.weight)
        True
    """
    if parametrize.is_parametrized(module, name):
        with evaluating(module), torch.no_grad(), parametrize.cached():
            return getattr(module, name).detach()
    for hook in norm_hooks(module):
        if getattr(hook, "name", None) == name:
            with torch.no_grad():
                if type(hook).__name__ == "SpectralNorm":
                    return hook.compute_weight(module, do_power_iteration=False).detach()
                return hook.compute_weight(module).detach()
    value = getattr(module, name)
    return value.detach() if isinstance(value, Tensor) else value


def raw_weight(module: nn.Module) -> Tensor:
    """A tensor with the dtype and device of ``module.weight``, read without computing anything.

    Example:
        >>> raw_weight(nn.utils.parametrizations.spectral_norm(nn.Conv2d(2, 2, 3))).shape
        torch.Size([2, 2, 3, 3])
    """
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    for hook in norm_hooks(module):
        name = getattr(hook, "name", "weight")
        for suffix in ("_orig", "_v"):
            t = getattr(module, name + suffix, None)
            if isinstance(t, Tensor):
                return t
    return module.weight


def plain_view(conv: _ConvNd) -> _ConvNd:
    """``conv`` itself when its weight and bias are plain parameters; else a plain conv of its torch class
    (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``) holding them.

    The view's parameters are the effective (eval-mode) weight and bias, with the
    ``requires_grad`` of the tensors they are computed from, on their device and dtype;
    its train flag follows ``conv``. Reading them changes nothing in ``conv``.
    """
    if weight_norm_kind(conv) is None:
        return conv
    weight = effective_tensor(conv, "weight")
    bias = effective_tensor(conv, "bias")
    base = next(c for c in type(conv).__mro__ if c.__module__ == _ConvNd.__module__ and not c.__name__.startswith("_"))
    extra = {"output_padding": conv.output_padding} if conv.transposed else {}
    view = base(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=bias is not None, padding_mode=conv.padding_mode,
                device="meta", dtype=weight.dtype, **extra)
    grad = raw_weight(conv).requires_grad
    view.weight = nn.Parameter(weight.clone(), requires_grad=grad)
    if bias is not None:
        view.bias = nn.Parameter(bias.clone(), requires_grad=grad)
    return view.train(conv.training)


def leaf_memo(model: nn.Module) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo that lets a model holding hook-based norms be copied.

    The old ``weight_norm``/``spectral_norm`` keep the computed weight as a plain
    attribute, which is not a graph leaf right after the norm was applied (deepcopy
    refuses those). The memo maps each such tensor to a detached alias: the hook
    replaces the attribute on every forward, so nothing writes through it.

    Example:
        >>> import copy, warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     net = nn.Sequential(nn.utils.weight_norm(nn.Conv2d(2, 2, 3)))
        >>> copy.deepcopy(net, leaf_memo(net))[0].weight.shape
        torch.Size([2, 2, 3, 3])

    Any other non-leaf tensor a module keeps as a plain attribute or in a dict/list/tuple
    attribute (a forward that stores ``self.last = features(x)``, or an attention-bias cache
    filled by an eval forward run with gradients) is mapped the same way.
    """
    memo: dict[int, Any] = {}

    def note(t: Tensor) -> Tensor:
        memo[id(t)] = t.detach()
        return t  # the model itself is not changed

    _map_non_leaf(model, note)
    return memo


def detach_cached(model: nn.Module) -> None:
    """Replace, in place, every non-leaf tensor a module keeps in an attribute (or a dict/list in one) by
    its detached value.

    A forward run with gradients enabled (capture's eager run, which reads final predictors off
    the autograd graph) lets a model that caches computed tensors (timm's LeViT and
    EfficientFormer attention-bias caches) keep graph-attached ones, which ``copy.deepcopy``
    refuses. The values are unchanged; only their autograd history is dropped.

    Example:
        >>> m = nn.Linear(2, 2)
        >>> m.cache = {"w": m.weight * 2}
        >>> detach_cached(m); m.cache["w"].is_leaf
        True
    """
    _map_non_leaf(model, Tensor.detach)


def _map_non_leaf(model: nn.Module, fn: Callable[[Tensor], Tensor]) -> None:
    """Call ``fn`` on every non-leaf tensor a module keeps in an attribute, or up to 3 levels deep in
    dicts/lists/tuples there (parameters and buffers, always leaves, aside); where ``fn`` returns
    another tensor it takes the old one's place."""

    def visit(value: Any, depth: int) -> Any:
        if isinstance(value, Tensor):
            return fn(value) if not value.is_leaf else value
        if depth and isinstance(value, (dict, list)):
            for k, v in (list(value.items()) if isinstance(value, dict) else list(enumerate(value))):
                new = visit(v, depth - 1)
                if new is not v:
                    value[k] = new
        elif depth and isinstance(value, tuple) and not hasattr(value, "_fields"):
            items = [visit(v, depth - 1) for v in value]
            if any(a is not b for a, b in zip(items, value)):
                return tuple(items)
        return value

    for module in model.modules():
        for key, value in list(module.__dict__.items()):
            if key not in ("_parameters", "_buffers", "_modules"):
                new = visit(value, 3)  # also caches: timm's LeViT/EfficientFormer keep {key: bias} dicts
                if new is not value:
                    module.__dict__[key] = new
