# SPDX-License-Identifier: Apache-2.0
"""Which convs can be swapped safely: parameters read elsewhere, lazy convs, hooks, parametrizations.

Replacing a conv removes its ``weight`` and ``bias``. That breaks code that reads them
outside the conv's own call — kernel reuse (``F.conv2d(x, self.conv.weight,
dilation=2)``), dtype reads (``x.to(self.conv.weight.dtype)``), tied weights, hooks that
read ``module.weight`` — and the returned model would raise AttributeError (or silently
use a stale tensor) on its first call. :func:`check_safety` finds those convs by a
**probing forward**: the model runs once on the example input (eval mode, ``no_grad``,
like the capture) under a :class:`~torch.overrides.TorchFunctionMode` that sees every
torch operation, attribute reads such as ``.dtype``/``.shape`` included, and notes each
one that takes a conv's parameter while that conv is not running its own forward (its
own hooks count as outside, except on a conv with a hook-based weight norm, whose pre-hooks
all count as inside since the norm's pre-hook computes the weight). This sees what eager runs, works whether or not fx or
torch.export can capture the model, and also sees hooks; a branch the example input
does not take (e.g. a training-only path) is not seen.

A conv is also kept dense when it is **lazy** (``LazyConv2d`` with uninitialised
parameters: there is nothing to factorise, and dsrewrite never materialises the
caller's module; a model whose forward reaches such a module is refused before
anything runs) or has **hooks that cannot be carried** (:mod:`dsrewrite.planning.hooks`).
Forward hooks and pre-hooks are carried; the plan says how many, and says when a
parametrized or weight-normed conv's weight is folded into the block.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from torch import nn
    >>> class Reuse(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(4, 4, 3, padding=1)
    ...     def forward(self, x):
    ...         return self.conv(x) + F.conv2d(x, self.conv.weight, padding=2, dilation=2)
    >>> s = check_safety(Reuse(), torch.randn(1, 4, 8, 8))
    >>> print(s.refusal("conv"))  # doctest: +ELLIPSIS
    its parameters are read outside its own forward (torch.conv2d while Reuse '(root)' runs): ...
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedModelError
from ..runtime.conv_weight import norm_hooks, weight_norm_kind
from ..runtime.preflight import example_input
from ..runtime.run import evaluating
from .hooks import blocking_hooks, carryable_hooks

__all__ = ["Safety", "check_safety", "static_safety", "is_lazy"]

_PROBE = ("seen by a probing forward on the example input: every torch operation, attribute reads included, "
          "that takes a conv's parameter outside that conv's own forward")


def is_lazy(module: nn.Module) -> bool:
    """True for a lazy module (``LazyConv2d``, ...) whose parameters are not initialised yet.

    Example:
        >>> is_lazy(nn.LazyConv2d(8, 3)), is_lazy(nn.Conv2d(3, 8, 3))
        (True, False)
    """
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


@dataclass(frozen=True)
class Safety:
    """What the safety checks found, by conv name.

    ``reads`` maps a conv to how its parameters were seen read outside its own forward;
    ``probed`` says whether the probing forward ran (``note`` says how reads were looked for, or why not).
    """

    reads: Mapping[str, str] = field(default_factory=dict)
    probed: bool = False
    note: str = ""
    modules: Mapping[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)

    def refusal(self, name: str) -> Optional[str]:
        """Why the conv ``name`` must stay dense, or ``None`` when it can be replaced."""
        conv = self.modules.get(name)
        if conv is None:
            return None
        if is_lazy(conv):
            return (f"it is lazy ({type(conv).__name__}): its parameters are not initialised, so there is nothing "
                    "to factorise; dsrewrite does not materialise your module. Run one forward pass (or load the "
                    "weights) first")
        if name in self.reads:
            return (f"its parameters are read outside its own forward ({self.reads[name]}): the block that "
                    "replaces it has no 'weight', so that code would fail. Exclude it, or make the code call the "
                    "module")
        return blocking_hooks(conv)

    def remarks(self, name: str) -> list[str]:
        """What the plan says about a replaced conv: hooks carried, a norm folded."""
        conv = self.modules.get(name)
        if conv is None:
            return []
        out = []
        n = carryable_hooks(conv)
        if n:
            out.append(f"hooks carried: {n}")
        kind = weight_norm_kind(conv)
        if kind:
            how = ("read in eval mode through torch.nn.utils.parametrize.cached(), nothing written"
                   if kind.startswith("parametrized") else "computed from its parameters without a power iteration")
            out.append(f"weight {kind} folded into the block ({how})")
        return out


def static_safety(model: nn.Module) -> Safety:
    """The checks that need no forward (lazy, hooks); parameter reads are not looked for."""
    return Safety(probed=False, note="parameter reads outside a conv's forward were not looked for (no probing "
                  "forward)", modules=_convs(model))


def _convs(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _ConvNd)}  # every conv the kinds take


class _LazyReached(Exception):
    pass


class _ReadSpy(TorchFunctionMode):
    """Notes torch operations that take a watched tensor while none of its owning convs is running."""

    def __init__(self, owners: dict[int, list[int]], active: Counter, stack: list[nn.Module],
                 names: dict[int, str], reads: dict[str, str]) -> None:
        super().__init__()
        self.owners, self.active, self.stack, self.names, self.reads = owners, active, stack, names, reads

    def _check(self, value: Any, func: Any) -> None:
        if not isinstance(value, Tensor):
            return
        owner_ids = self.owners.get(id(value))
        if not owner_ids or any(self.active[c] for c in owner_ids):
            return
        top = self.stack[-1] if self.stack else None
        where = f"{type(top).__name__} {self.names.get(id(top), '?') or '(root)'!r}" if top is not None else "the caller"
        self_ = getattr(func, "__self__", None)
        name = getattr(func, "__name__", None) or type(func).__name__
        if name == "__get__":  # a property read: .dtype, .shape, .device, ...
            label = f"a read of .{getattr(self_, '__name__', '?')}"
        elif getattr(func, "__module__", None) == "torch":
            label = f"torch.{name}"
        else:
            label = f"Tensor.{name}"
        for c in owner_ids:
            self.reads.setdefault(self.names[c], f"{label} while {where} runs")

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        for a in (*args, *(kwargs or {}).values()):
            if isinstance(a, (list, tuple)):
                for b in a:
                    self._check(b, func)
            else:
                self._check(a, func)
        return func(*args, **(kwargs or {}))


def _args(model: nn.Module, example_inputs: Any, input_shape: Sequence[int]) -> Optional[tuple[Any, ...]]:
    if example_inputs is None:
        try:
            return (example_input(model, input_shape),)
        except (TypeError, ValueError, RuntimeError):
            return None  # a bad shape: the capture says so
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return None


def check_safety(model: nn.Module, example_inputs: Any = None, *,
                 input_shape: Sequence[int] = (1, 3, 224, 224)) -> Safety:
    """Run the probing forward (see the module docstring) and return what it and the static checks found.

    Raises:
        UnsupportedModelError: the forward reaches a lazy module whose parameters are not
            initialised (running it would materialise the caller's module).
    """
    convs = _convs(model)
    names = {id(m): n for n, m in model.named_modules()}
    args = _args(model, example_inputs, input_shape)
    if args is None:
        return Safety(probed=False, note="parameter reads were not looked for: no example input to probe with",
                      modules=convs)
    owners: dict[int, list[int]] = {}
    for conv in convs.values():
        for p in conv.parameters():
            owners.setdefault(id(p), []).append(id(conv))
    attrs: list[tuple[nn.Module, str]] = []  # hook-based norms: the computed weight is a plain attribute
    for conv in convs.values():
        for hook in norm_hooks(conv):
            attrs.append((conv, getattr(hook, "name", "weight")))

    kept: list[Tensor] = []  # watched by id: each stays alive for the probe, so no other tensor reuses its id

    def watch_attrs() -> None:
        for conv, attr in attrs:
            value = conv.__dict__.get(attr)
            if isinstance(value, Tensor) and id(conv) not in owners.get(id(value), []):
                owners.setdefault(id(value), []).append(id(conv))
                kept.append(value)

    reads: dict[str, str] = {}
    active: Counter = Counter()
    stack: list[nn.Module] = []
    handles = []

    def push(mod: nn.Module, _args: Any) -> None:
        stack.append(mod)
        active[id(mod)] += 1

    def pop(mod: nn.Module, _args: Any, _out: Any) -> None:
        if stack and stack[-1] is mod:
            stack.pop()
            active[id(mod)] -= 1
        watch_attrs()

    def lazy(mod: nn.Module, _args: Any) -> None:
        raise _LazyReached(names.get(id(mod), "?"))

    try:
        for mod in model.modules():
            if is_lazy(mod):
                handles.append(mod.register_forward_pre_hook(lazy, prepend=True))
            # a norm hook computes the weight before the forward: it counts as the conv's own
            handles.append(mod.register_forward_pre_hook(push, prepend=bool(norm_hooks(mod))))
            handles.append(mod.register_forward_hook(pop, prepend=True, always_call=True))
        watch_attrs()
        with evaluating(model), torch.no_grad(), _ReadSpy(owners, active, stack, names, reads):
            model(*args)
    except _LazyReached as exc:
        mod = model.get_submodule(str(exc)) if str(exc) != "?" else None
        raise UnsupportedModelError(
            f"{type(model).__name__}: module {str(exc) or '(root)'!r} ({type(mod).__name__}) is lazy and its "
            "parameters are not initialised; running the model would materialise them in your model, with random "
            "values. Run one forward pass (or load the weights) first, then rewrite."
        ) from None
    except Exception as exc:  # the capture runs the same forward and reports a failure properly
        return Safety(probed=False, note=f"parameter reads were not looked for: the probing forward failed "
                      f"({type(exc).__name__})", modules=convs)
    finally:
        for h in handles:
            h.remove()
    return Safety(reads=reads, probed=True, note=_PROBE, modules=convs)
