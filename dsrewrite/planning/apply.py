"""Carry out a plan: swap the selected convs for the blocks their kinds build (:mod:`dsrewrite.kinds`).

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
from typing import Any, Optional

from torch import Tensor, nn

from .errors import DsRewriteError, PlanError, RewriteError, UnsupportedModelError, did_you_mean
from .kinds import get_kind, kind_names
from .plan_types import Plan

__all__ = ["apply_plan", "set_submodule", "module_aliases", "check_rewritable", "UnsupportedModelError"]


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
        meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
        if meta:
            raise UnsupportedModelError(
                f"{type(model).__name__} has tensors on the meta device ({_few(meta, 2)}): they hold no values, so "
                "there is nothing to factorise (SVD), run or report on. Load the weights first "
                "(model.to_empty(device='cpu') then load_state_dict). For a structure-only rewrite, e.g. to "
                "load a saved rewrite's weights, use apply_plan(model, plan, init='random')."
            )


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


def _copy_without_replaced_weights(model: nn.Module, plan: Plan) -> nn.Module:
    """``copy.deepcopy(model)`` that does not copy the weights of the convs about to be replaced.

    Their parameters are shared with the original in the copy (the deepcopy memo maps
    them to themselves) only until each conv is swapped for a new block, which reads
    them and never writes them; a parameter that any other module also holds (tied
    weights) is copied as usual. This keeps the peak memory of a rewrite at one copy of
    what is *not* replaced, instead of one copy of the whole model.
    """
    replaced = {e.name for e in plan.replaced}
    owners: dict[int, set[str]] = {}
    for qual, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), set()).add(qual.rpartition(".")[0])
    memo: dict[int, Any] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name in replaced:
            for param in module.parameters(recurse=False):
                if owners.get(id(param), set()) <= replaced:
                    memo[id(param)] = param
    return copy.deepcopy(model, memo)


def apply_plan(model: nn.Module, plan: Plan, *, inplace: bool = False, init: Optional[str] = None) -> nn.Module:
    """Return ``model`` with every ``replace`` entry of ``plan`` swapped in.

    ``init`` overrides each entry's init (``"random"`` is what reloading from a plan
    plus a state dict uses: the weights are loaded afterwards).

    Raises:
        PlanError: an entry names a module the model lacks, a kind (``order``) that is
            not registered, or a conv its kind refuses (e.g. the plan was made for
            another architecture).
        UnsupportedModelError: the model holds quantized convs, or an entry
            initialised by SVD names a conv on the meta device.
    """
    check_rewritable(model, needs_weights=False)
    modules = dict(model.named_modules())
    for e in plan.replaced:
        if e.name not in modules:
            raise PlanError(
                f"plan entry {e.name!r} names no module of {type(model).__name__}. Hint: the plan was made "
                "for another architecture, or the model is wrapped (DataParallel adds 'module.')."
            )
        if e.config is None:
            raise PlanError(f"plan entry {e.name!r} is 'replace' but carries no config")
        if e.config.order not in kind_names():
            raise PlanError(
                f"plan entry {e.name!r}: order {e.config.order!r} is not a registered replacement kind; valid "
                f"options: {', '.join(repr(k) for k in kind_names())}{did_you_mean(str(e.config.order), kind_names())}. "
                "Hint: a plan made with a custom kind needs that kind registered (dsrewrite.kinds.register_kind)."
            )
        try:
            get_kind(e.config.order).check(modules[e.name], name=e.name)
        except DsRewriteError as exc:
            raise PlanError(f"plan entry {e.name!r} cannot be applied: {exc}") from exc
        weight = modules[e.name].weight
        if (init or e.config.init) == "svd" and isinstance(weight, Tensor) and weight.device.type == "meta":
            raise UnsupportedModelError(
                f"plan entry {e.name!r}: the conv lives on the meta device, so it has no weights to factorise "
                "(init 'svd'). Load the weights first, or pass init='random' for a structure-only rewrite."
            )
    target = model if inplace else _copy_without_replaced_weights(model, plan)
    done: dict[int, nn.Module] = {}
    try:
        for e in plan.replaced:
            conv = target.get_submodule(e.name)
            if id(conv) in done:  # a shared module already swapped through another alias
                continue
            cfg = e.config
            assert cfg is not None  # checked above
            new = get_kind(cfg.order).build(conv, cfg, init=init, name=e.name)
            set_submodule(target, e.name, new)
            done[id(conv)] = new
            done[id(new)] = new
    except DsRewriteError:
        raise
    except Exception as exc:  # pragma: no cover - unexpected torch failure
        raise RewriteError(f"swapping the convs failed: {type(exc).__name__}: {exc}") from exc
    return target
