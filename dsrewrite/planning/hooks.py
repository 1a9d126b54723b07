# SPDX-License-Identifier: Apache-2.0
"""Hooks registered on a conv that is about to be replaced: which carry over to the new block, which forbid it.

A forward pre-hook sees the module's input and may change it; a forward hook sees
the input and the output and may change the output. The block that replaces a conv
takes the same input tensor and returns (an approximation of) the same output
tensor, so these hooks keep their meaning on it: they are **carried** (with their
``with_kwargs`` and ``always_call`` flags, in their order). Two things are not
carried:

* the old hook-based ``weight_norm``/``spectral_norm`` pre-hooks: they compute the
  conv's weight, which the block holds folded in (they are *folded*, not lost);
* full backward hooks (``register_full_backward_hook``/``_pre_hook``, and the old
  ``register_backward_hook``) and state-dict hooks (``state_dict``/``load_state_dict``
  pre- and post-hooks, except those of a folded spectral norm): their meaning is tied to
  the conv's own gradients and parameter names, so a conv holding one is **not
  replaced** (:func:`blocking_hooks` gives the reason).

A hook that reads the conv's parameters (``module.weight``) would fail on the block;
:mod:`dsrewrite.planning.safety` sees that on the probing forward and skips the conv.

Example:
    >>> import torch
    >>> from torch import nn
    >>> conv, block = nn.Conv2d(2, 2, 3), nn.Identity()
    >>> h = conv.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    >>> carryable_hooks(conv), blocking_hooks(conv)
    (1, None)
    >>> carry_hooks(conv, block)
    1
    >>> block(torch.ones(1))
    tensor([2.])
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

from torch import nn

from ..runtime.conv_weight import norm_hooks

__all__ = ["carryable_hooks", "blocking_hooks", "carry_hooks", "hook_name"]


def hook_name(hook: Any) -> str:
    """A readable name for a hook: its function's qualified name (``functools.partial`` looked through)."""
    fn = getattr(hook, "func", hook)
    fn = getattr(fn, "hook", fn)  # torch's _WrappedHook
    return str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)


def _folded(module: nn.Module) -> set[int]:
    return {id(h) for h in norm_hooks(module)}


def _unwrap(hook: Any) -> Any:
    return getattr(hook, "hook", hook)  # load_state_dict hooks are stored wrapped


def _is_norm_state_hook(hook: Any) -> bool:
    return type(_unwrap(hook)).__module__ in ("torch.nn.utils.spectral_norm", "torch.nn.utils.weight_norm")


def carryable_hooks(module: nn.Module) -> int:
    """How many forward (pre-)hooks of ``module`` carry over to its replacement."""
    folded = _folded(module)
    return sum(id(h) not in folded for h in module._forward_pre_hooks.values()) + len(module._forward_hooks)


def blocking_hooks(module: nn.Module) -> Optional[str]:
    """Why ``module``'s hooks forbid replacing it, or ``None`` when they do not.

    Example:
        >>> conv = nn.Conv2d(2, 2, 3)
        >>> _ = conv.register_full_backward_hook(lambda m, gi, go: None)
        >>> blocking_hooks(conv)
        'it has a full backward hook (<lambda>): its gradients are those of the dense conv, which the block does not compute; remove the hook or exclude the conv'
    """
    backward = [*module._backward_pre_hooks.values(), *module._backward_hooks.values()]
    if backward:
        names = ", ".join(hook_name(h) for h in backward)
        return (f"it has a full backward hook ({names}): its gradients are those of the dense conv, which the block "
                "does not compute; remove the hook or exclude the conv")
    state = [h for d in (module._state_dict_hooks, module._state_dict_pre_hooks, module._load_state_dict_pre_hooks,
                         module._load_state_dict_post_hooks) for h in d.values() if not _is_norm_state_hook(h)]
    if state:
        names = ", ".join(hook_name(h) for h in state)
        return (f"it has a state-dict hook ({names}): it is written for the conv's parameter names, which the block "
                "does not have; remove the hook or exclude the conv")
    return None


def carry_hooks(old: nn.Module, new: nn.Module) -> int:
    """Register ``old``'s forward pre-hooks and forward hooks on ``new`` (same order and flags); return how many.

    Hook-based norm pre-hooks are left behind (the block holds the normalised weight).
    The hooks keep their ids, so the flags (``with_kwargs``, ``always_call``) stay attached.
    """
    folded = _folded(old)
    pre = OrderedDict((k, h) for k, h in old._forward_pre_hooks.items() if id(h) not in folded)
    new._forward_pre_hooks.update(pre)
    new._forward_pre_hooks_with_kwargs.update({k: v for k, v in old._forward_pre_hooks_with_kwargs.items()
                                               if k in pre})
    new._forward_hooks.update(old._forward_hooks)
    new._forward_hooks_with_kwargs.update(old._forward_hooks_with_kwargs)
    new._forward_hooks_always_called.update(old._forward_hooks_always_called)
    return len(pre) + len(old._forward_hooks)
