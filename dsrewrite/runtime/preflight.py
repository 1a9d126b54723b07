# SPDX-License-Identifier: Apache-2.0
"""Preflight: what every entry point checks once about the user's model, then passes down.

:func:`preflight` strips ``DataParallel``/``DistributedDataParallel``/``torch.compile``
wrappers, refuses what cannot be rewritten (:func:`check_rewritable`) and reads the
device and floating dtype, once per call: ``rewrite()`` hands the :class:`Preflight`
record to planning, applying and reporting instead of each checking again.

Example:
    >>> pf = preflight(nn.DataParallel(nn.Conv2d(3, 8, 3)))
    >>> type(pf.model).__name__, type(pf.wrapper).__name__, pf.device, pf.dtype
    ('Conv2d', 'DataParallel', device(type='cpu'), torch.float32)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..errors import InputShapeError, UnsupportedModelError
from .input_files import check_alloc

__all__ = [
    "Preflight",
    "preflight",
    "unwrap_for_rewrite",
    "is_compiled",
    "unwrap_parallel",
    "check_rewritable",
    "device_dtype",
    "example_input",
]


@dataclass(frozen=True)
class Preflight:
    """The model to work on (``model``, unwrapped), its outermost wrapper or ``None``, its device and dtype."""

    model: nn.Module
    wrapper: Optional[nn.Module]
    device: torch.device
    dtype: torch.dtype


def preflight(model: nn.Module, *, inplace: bool = False, needs_weights: bool = True) -> Preflight:
    """Unwrap ``model``, refuse what cannot be rewritten, read its device and dtype: once per call.

    Raises:
        UnsupportedModelError: quantized convs, tensors on the meta device (with
            ``needs_weights``), ``inplace=True`` on a ``DistributedDataParallel``.

    Example:
        >>> preflight(nn.Conv2d(3, 8, 3, dtype=torch.float64)).dtype
        torch.float64
    """
    inner, outer = unwrap_for_rewrite(model, inplace=inplace)
    check_rewritable(inner, needs_weights=needs_weights)
    device, dtype = device_dtype(inner)
    return Preflight(inner, outer, device, dtype)


def is_compiled(model: nn.Module) -> bool:
    """A ``torch.compile`` wrapper (``torch._dynamo.eval_frame.OptimizedModule``), without importing dynamo.

    Example:
        >>> is_compiled(nn.Linear(2, 2))
        False"""
    t = type(model)
    return t.__name__ == "OptimizedModule" and t.__module__ == "torch._dynamo.eval_frame" and \
        isinstance(getattr(model, "_orig_mod", None), nn.Module)


def unwrap_parallel(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Strip ``nn.DataParallel``/``DistributedDataParallel``/``torch.compile`` wrappers; say what was stripped.

    Example:
        >>> m, notes = unwrap_parallel(nn.DataParallel(nn.Linear(2, 2)))
        >>> type(m).__name__, notes
        ('Linear', ['unwrapped nn.DataParallel'])
    """
    notes = []
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(model, wrappers):
            notes.append(f"unwrapped nn.{type(model).__name__}")
            model = model.module
        elif is_compiled(model):
            notes.append("unwrapped torch.compile")
            model = model._orig_mod
        else:
            return model, notes


_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)
_PREFIX = "module."


def unwrap_for_rewrite(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, Optional[nn.Module]]:
    """Strip ``nn.DataParallel``/``DistributedDataParallel``/``torch.compile`` wrappers: ``(inner, outermost or None)``.

    The rewrite works on the inner model, so plan names carry no ``module.`` prefix
    and fit a fresh, unwrapped instance of the architecture. A DDP wrapper cannot
    be rewritten in place: its gradient hooks are bound to the old parameters.

    Raises:
        UnsupportedModelError: ``inplace=True`` on a ``DistributedDataParallel``.

    Example:
        >>> inner, wrapper = unwrap_for_rewrite(nn.DataParallel(nn.Conv2d(3, 8, 3)))
        >>> type(inner).__name__, type(wrapper).__name__
        ('Conv2d', 'DataParallel')
    """
    outer: Optional[nn.Module] = model if isinstance(model, _WRAPPERS) or is_compiled(model) else None
    while isinstance(model, _WRAPPERS) or is_compiled(model):
        if is_compiled(model):
            model = model._orig_mod  # torch.compile: the result comes back uncompiled (compile it again)
            continue
        if inplace and isinstance(model, nn.parallel.DistributedDataParallel):
            raise UnsupportedModelError(
                "cannot rewrite a DistributedDataParallel in place: its gradient hooks are bound to the old "
                "parameters. Rewrite model.module (or pass inplace=False) and wrap the result in a new DDP."
            )
        model = model.module
    return model, outer


def _quantized_conv_types() -> tuple[type, ...]:
    try:
        from torch.ao.nn.quantized.modules.conv import _ConvNd as QuantizedConvNd
    except ImportError:  # pragma: no cover - torch without torch.ao
        return ()
    return (QuantizedConvNd,)


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def check_rewritable(model: nn.Module, *, needs_weights: bool = True) -> None:
    """Refuse, with one clear message, a model dsrewrite cannot rewrite as a whole.

    * quantized convs (``torch.ao.nn.quantized`` static or dynamic ``Conv*``): their
      weights are packed int8, not a float kernel to factorise;
    * with ``needs_weights`` (SVD initialisation, planning, the report): parameters
      or buffers on the meta device, which hold no values.

    Quantized non-conv modules (a dynamically quantized ``Linear``) are fine: they are
    left as they are.

    Raises:
        UnsupportedModelError: (a :class:`~dsrewrite.errors.UsageError`, CLI exit 2).

    Example:
        >>> check_rewritable(nn.Conv2d(3, 8, 3))
        >>> check_rewritable(nn.Conv2d(3, 8, 3, device="meta"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        dsrewrite.errors.UnsupportedModelError: Conv2d has tensors on the meta device ('weight', 'bias'): ...
    """
    qtypes = _quantized_conv_types()
    quantized = [(n or "(root)", type(m)) for n, m in model.named_modules() if qtypes and isinstance(m, qtypes)]
    if quantized:
        cls = quantized[0][1]
        raise UnsupportedModelError(
            f"{type(model).__name__} holds {len(quantized)} quantized conv(s) ({_few([n for n, _ in quantized])}, "
            f"a {cls.__module__}.{cls.__qualname__}): their weights are packed integers, not a float kernel "
            "to factorise. Rewrite the float model before quantizing it, then quantize the result."
        )
    if needs_weights:
        lazy = [n or "(root)" for n, m in model.named_modules()
                if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
        if lazy:
            raise UnsupportedModelError(
                f"{type(model).__name__} holds {len(lazy)} lazy module(s) with uninitialised parameters "
                f"({_few(lazy)}): they have no values to factorise, count or save, and dsrewrite does not "
                "materialise your model. Run one forward pass (or load the weights) first."
            )
        meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
        if meta:
            raise UnsupportedModelError(
                f"{type(model).__name__} has tensors on the meta device ({_few(meta, 2)}): they hold no values, so "
                "there is nothing to factorise (SVD), run or report on. Load the weights first "
                "(model.to_empty(device='cpu') then load_state_dict). For a structure-only rewrite, e.g. to "
                "load a saved rewrite's weights, use apply_plan(model, plan, init='random')."
            )


def device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of ``model``'s first parameter (cpu/float32 when there is none or it is meta).

    Example:
        >>> device_dtype(nn.Linear(2, 2).double())
        (device(type='cpu'), torch.float64)
    """
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None and p.device.type != "meta" else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return device, dtype


def example_input(model: nn.Module, input_shape: Sequence[int] = (1, 3, 224, 224), *, seed: int = 0) -> Tensor:
    """A seeded standard-normal input on the model's device and floating dtype.

    Example:
        >>> example_input(nn.Conv2d(3, 8, 3), (1, 3, 8, 8)).shape
        torch.Size([1, 3, 8, 8])
    """
    device, dtype = device_dtype(model)
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise InputShapeError(f"input shape {shape} needs positive sizes, e.g. (1, 3, 224, 224).")
    check_alloc(shape, 4, "input shape", error=InputShapeError)  # drawn in float32 first: refused before allocating
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)
