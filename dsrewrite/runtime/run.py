# SPDX-License-Identifier: Apache-2.0
"""Running a model without changing it, and reading what it returns.

Example:
    >>> net = nn.Sequential(nn.Dropout(), nn.Linear(2, 2)).train()
    >>> with evaluating(net):
    ...     out = call_model(net, torch.ones(1, 2))
    >>> net.training, [p for p, _ in flatten_outputs({"b": out, "a": [out, None]})]
    (True, ['a[0]', 'b'])
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn

from ..errors import InputShapeError

__all__ = ["evaluating", "call_model", "describe_inputs", "run_model", "flatten_outputs", "first_tensor"]


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode and restore every submodule's train flag on exit.

    Example:
        >>> m = nn.Sequential(nn.Dropout(), nn.Linear(2, 2)).train()
        >>> m[1].eval()  # doctest: +ELLIPSIS
        Linear(...)
        >>> with evaluating(m):
        ...     m.training
        False
        >>> m.training, m[1].training
        (True, False)
    """
    flags = [(mod, mod.training) for model in models for mod in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for mod, flag in flags:
            mod.training = flag


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on ``inputs``: a tensor, a tuple/list of positional args, or a dict of kwargs.

    Example:
        >>> call_model(nn.Identity(), (torch.ones(1),))
        tensor([1.])
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def describe_inputs(inputs: Any) -> str:
    """Shapes of ``inputs`` for messages, e.g. ``'(1, 3, 64, 64)'``.

    Example:
        >>> describe_inputs((torch.zeros(1, 3), torch.zeros(2)))
        '(1, 3), (2,)'
    """
    if isinstance(inputs, Tensor):
        return str(tuple(inputs.shape))
    if isinstance(inputs, Mapping):
        return ", ".join(f"{k}={describe_inputs(v)}" for k, v in inputs.items())
    if isinstance(inputs, (tuple, list)):
        return ", ".join(describe_inputs(v) for v in inputs)
    return type(inputs).__name__


def run_model(model: nn.Module, inputs: Any) -> Any:
    """:func:`call_model`, raising :class:`InputShapeError` (naming the input's shapes) when the model fails.

    Example:
        >>> run_model(nn.Linear(3, 2), torch.zeros(1, 4))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        dsrewrite.errors.InputShapeError: model Linear failed to run on example input (1, 4): RuntimeError: ...mat1 and mat2 shapes cannot be multiplied (1x4 and 3x2). Hint: pass an input of the shape, dtype and device the model expects (e.g. --input-shape 1,3,224,224).
    """
    try:
        return call_model(model, inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise InputShapeError(
            f"model {type(model).__name__} failed to run on example input {describe_inputs(inputs)}: "
            f"{type(exc).__name__}: {exc}. Hint: pass an input of the shape, dtype and device "
            "the model expects (e.g. --input-shape 1,3,224,224)."
        ) from exc


def first_tensor(value: Any) -> Optional[Tensor]:
    """The first tensor leaf of ``value`` (tuples and lists by position, dicts in their own order), or ``None``.

    Example:
        >>> first_tensor((None, {"x": torch.zeros(2)})).shape
        torch.Size([2])
    """
    if isinstance(value, Tensor):
        return value
    values = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for v in values:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def flatten_outputs(out: Any, path: str = "", *, strict: bool = False,
                    sort_keys: bool = True) -> list[tuple[str, Tensor]]:
    """``[(path, tensor), ...]`` for every tensor leaf: sequences by position, dicts by sorted key
    (``sort_keys=False``: in the dict's own order, as exporters flatten a model's outputs).

    Non-tensor leaves (``None``, numbers, strings) are left out; with ``strict`` only
    tensors, tuples/lists and dicts are accepted and anything else raises ``TypeError``
    (naming its type).

    Example:
        >>> [p for p, _ in flatten_outputs({"out": torch.zeros(1), "aux": (torch.zeros(1), None)})]
        ['aux[0]', 'out']
        >>> flatten_outputs([torch.zeros(1), "x"], strict=True)
        Traceback (most recent call last):
        ...
        TypeError: str
    """
    if isinstance(out, Tensor):
        return [(path, out)]
    if isinstance(out, Mapping):
        leaves: list[tuple[str, Tensor]] = []
        for k in (sorted(out, key=str) if sort_keys else out):
            leaves += flatten_outputs(out[k], f"{path}.{k}" if path else str(k), strict=strict, sort_keys=sort_keys)
        return leaves
    if isinstance(out, (tuple, list)):
        leaves = []
        for i, v in enumerate(out):
            leaves += flatten_outputs(v, f"{path}[{i}]", strict=strict, sort_keys=sort_keys)
        return leaves
    if strict:
        raise TypeError(type(out).__name__)
    if hasattr(out, "__dataclass_fields__"):  # e.g. HuggingFace-style output records
        return flatten_outputs({k: getattr(out, k) for k in out.__dataclass_fields__}, path, sort_keys=sort_keys)
    return []
