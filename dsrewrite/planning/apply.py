# SPDX-License-Identifier: Apache-2.0
"""Carry out a plan: swap the selected convs for the blocks their kinds build (:mod:`dsrewrite.kinds`).

The model's own class comes back (never a GraphModule), with submodules
swapped; device, dtype and train/eval mode are kept. The caller's model is
copied first unless ``inplace=True``. Every entry is checked before anything
is changed, so a failing plan leaves the model as it was.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dsrewrite.planning.types import LayerConfig, Plan, PlanEntry
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

from ..errors import DsRewriteError, PlanError, PlanFileError, RewriteError, UnsupportedModelError, did_you_mean
from ..kinds import get_kind, kind_names
from ..recipe.choices import MID_ACT_NAMES, MID_NORMS
from ..runtime.conv_weight import leaf_memo, plain_view, raw_weight
from ..runtime.modules import set_submodule
from .hooks import blocking_hooks, carry_hooks
from ..runtime.preflight import check_rewritable
from .plan_checks import check_finite_weights, check_rank
from .types import Plan

__all__ = ["apply_plan"]


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
    memo: dict[int, Any] = leaf_memo(model)  # hook-based weight norms hold a non-leaf computed weight
    for name, module in model.named_modules(remove_duplicate=False):
        if name in replaced:
            for param in module.parameters(recurse=False):
                if owners.get(id(param), set()) <= replaced:
                    memo[id(param)] = param
    return copy.deepcopy(model, memo)


def _copy_sharing_tensors(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that holds the very same parameter and buffer tensors (none copied).

    Swapping a conv in the copy leaves the original's module in place; but any in-place
    change to a tensor the two share shows in both. For callers that only read the
    original afterwards (the CLI: a teacher and a reference, both run in eval mode under
    ``no_grad``) and then drop it.
    """
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
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
    return apply_checked(model, plan, inplace=inplace, init=init)


def apply_checked(model: nn.Module, plan: Plan, *, inplace: bool = False, init: Optional[str] = None,
                  share_weights: bool = False) -> nn.Module:
    """:func:`apply_plan` for a model :func:`~dsrewrite.runtime.preflight.preflight` has already checked.

    ``share_weights=True`` (not in place): the result holds the original's tensors for every
    layer it keeps instead of copies (:func:`_copy_sharing_tensors`): no second copy of the model.
    """
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
        check_rank(e.name, modules[e.name], e.config.depth_multiplier, PlanFileError)  # before anything is built
        for key, options in (("mid_norm", MID_NORMS), ("mid_act", MID_ACT_NAMES)):
            value = getattr(e.config, key)
            if value is not None and value not in options:
                raise PlanFileError(f"plan entry {e.name!r}: {key} {value!r} is not one of "
                                    f"{', '.join(map(repr, options))} (or null){did_you_mean(str(value), options)}.")
        blocked = blocking_hooks(modules[e.name])
        if blocked:
            raise PlanError(f"plan entry {e.name!r} cannot be applied: {blocked}.")
        weight = raw_weight(modules[e.name])
        if (init or e.config.init) == "svd" and isinstance(weight, Tensor) and weight.device.type == "meta":
            raise UnsupportedModelError(
                f"plan entry {e.name!r}: the conv lives on the meta device, so it has no weights to factorise "
                "(init 'svd'). Load the weights first, or pass init='random' for a structure-only rewrite."
            )
    check_finite_weights(model, [e.name for e in plan.replaced if (init or (e.config and e.config.init)) == "svd"])
    target = model if inplace else _copy_sharing_tensors(model) if share_weights else \
        _copy_without_replaced_weights(model, plan)
    done: dict[int, nn.Module] = {}
    try:
        for e in plan.replaced:
            conv = target.get_submodule(e.name)
            if id(conv) in done:  # a shared module already swapped through another alias
                continue
            cfg = e.config
            assert cfg is not None  # checked above
            # parametrized/weight-normed convs: built from the eval-mode weight, read without side effects
            new = get_kind(cfg.order).build(plain_view(conv), cfg, init=init, name=e.name)
            carry_hooks(conv, new)  # forward (pre-)hooks keep their meaning: same input, same output
            set_submodule(target, e.name, new)
            done[id(conv)] = new
            done[id(new)] = new
    except DsRewriteError:
        raise
    except Exception as exc:  # pragma: no cover - unexpected torch failure
        raise RewriteError(f"swapping the convs failed: {type(exc).__name__}: {exc}") from exc
    return target
