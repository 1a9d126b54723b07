# SPDX-License-Identifier: Apache-2.0
"""Model inputs from user batches: the one rule calibrate, heal, the report and the CLI share.

Users bring data the way their training code has it: a DataLoader of ``(image, mask)``
tuples, of dicts, or plain tensors. :func:`model_inputs` turns one such batch into what the
model is called with (a tensor: ``model(x)``; a tuple: ``model(*args)``; a dict:
``model(**kwargs)``), by the first rule that applies:

1. ``input_fn`` given: ``input_fn(batch)`` is the model's inputs (as NNCF's ``transform_fn``).
2. a tensor (or NumPy array): the single input.
3. a dict: ``batch[input_key]`` when ``input_key`` is given; without it, the dict is passed as
   keyword arguments only if every key is a parameter of the model's ``forward``.
4. a tuple/list, for a model with ``n`` positional inputs: ``n == 1``: the first element is the
   input, the rest (masks, labels, file names) is ignored; ``n > 1``: the first ``n`` elements are
   the inputs (``(sample, timestep)`` or ``(sample, timestep, target)``), or the first element
   when it is itself a tuple/list of ``n`` (``((sample, timestep), target)``).

``n`` is the number of positional inputs of the example inputs (1 for a tensor, ``len`` for a
tuple/list); without example inputs, the number of ``forward`` parameters without a default
(at least 1). A batch no rule maps raises :class:`BatchError` (a ``UsageError``: CLI exit 2)
naming the batch index, what it holds and what to pass.

Example:
    >>> import torch
    >>> from torch import nn
    >>> spec = input_spec(nn.Conv2d(3, 8, 3))
    >>> model_inputs((torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8)), 0, spec).shape
    torch.Size([2, 3, 8, 8])
    >>> spec = input_spec(nn.Conv2d(3, 8, 3), input_key="image")
    >>> model_inputs({"image": torch.zeros(2, 3, 8, 8), "mask": torch.zeros(2)}, 0, spec).shape
    torch.Size([2, 3, 8, 8])
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn

from ..errors import UsageError, did_you_mean
from .batch_checks import check_batch

__all__ = ["BatchError", "InputSpec", "input_spec", "model_inputs", "iter_inputs", "batch_size_of",
           "positional_count", "to_device", "check_iterable"]

_HINT = ("Hint: pass input_key=<key of the input in a dict batch> or input_fn=<function: batch -> model "
         "inputs>; from the CLI, torch.save each batch's model inputs (a tensor, or a tuple for several "
         "inputs). See docs/data.md.")


class BatchError(UsageError):
    """A user batch cannot be turned into the model's inputs (CLI exit 2)."""


@dataclass(frozen=True)
class InputSpec:
    """How batches map to model inputs; build it with :func:`input_spec`.

    ``positional``: the model's number of positional inputs; ``keywords``: the names ``forward``
    accepts (``None``: any, it takes ``**kwargs``); ``kwargs_example``: the example inputs are a
    dict; ``where``: names the data in messages (``"calibration"``, ``"heal"``).
    """

    positional: int
    keywords: Optional[tuple[str, ...]]
    kwargs_example: bool = False
    input_key: Optional[Hashable] = None
    input_fn: Optional[Callable[[Any], Any]] = None
    where: str = "calibration"
    example: Any = None


def _forward_params(model: nn.Module) -> Optional[list[inspect.Parameter]]:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # builtins, odd callables
        return None


def positional_count(model: nn.Module, example_inputs: Any = None) -> int:
    """Number of positional inputs: from ``example_inputs`` when given, else ``forward``'s required parameters.

    Example:
        >>> import torch
        >>> class Two(nn.Module):
        ...     def forward(self, sample, timestep, scale=1.0):
        ...         return sample * timestep * scale
        >>> positional_count(Two()), positional_count(Two(), torch.zeros(1)), positional_count(nn.Identity())
        (2, 1, 1)
    """
    if isinstance(example_inputs, (tuple, list)):
        return max(1, len(example_inputs))
    if example_inputs is not None:
        return 1
    params = _forward_params(model) or []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return max(1, sum(1 for p in params if p.kind in kinds and p.default is inspect.Parameter.empty))


def input_spec(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    input_key: Optional[Hashable] = None,
    input_fn: Optional[Callable[[Any], Any]] = None,
    where: str = "calibration",
) -> InputSpec:
    """Check ``input_key``/``input_fn`` once and read the model's inputs (see the module docstring).

    Raises:
        BatchError: both ``input_key`` and ``input_fn`` given, or ``input_fn`` not callable.

    Example:
        >>> input_spec(nn.Identity()).positional
        1
    """
    if input_key is not None and input_fn is not None:
        raise BatchError(f"{where}: pass input_key or input_fn, not both (input_fn can read any key itself).")
    if input_fn is not None and not callable(input_fn):
        raise BatchError(f"{where}: input_fn must be a function batch -> model inputs, got {type(input_fn).__name__}.")
    params = _forward_params(model)
    keywords: Optional[tuple[str, ...]]
    if params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        keywords = None
    else:
        keywords = tuple(p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL)
    return InputSpec(positional_count(model, example_inputs), keywords, isinstance(example_inputs, Mapping),
                     input_key, input_fn, where, example_inputs)


def _describe(obj: Any, depth: int = 0) -> str:
    """Short description of a batch for messages, e.g. ``tuple of 2: (Tensor(2, 3, 8, 8), str)``."""
    if isinstance(obj, Tensor):
        return f"Tensor{tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        keys = list(obj)
        return f"dict with keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"
    if isinstance(obj, (tuple, list)):
        kind = type(obj).__name__
        if depth:
            return f"{kind} of {len(obj)}"
        inner = ", ".join(_describe(o, depth + 1) for o in obj[:4]) + (", ..." if len(obj) > 4 else "")
        return f"{kind} of {len(obj)}: ({inner})"
    return type(obj).__name__


def _tensor(obj: Any) -> Any:
    """A NumPy array as a tensor; anything else unchanged."""
    if type(obj).__module__ == "numpy" and hasattr(obj, "__array__") and getattr(obj, "ndim", 0) > 0:
        return torch.as_tensor(obj)
    return obj


def _leaves_ok(obj: Any) -> bool:
    """Tensors, numbers and None (e.g. an int timestep), nested in tuples/lists/dicts."""
    if isinstance(obj, (Tensor, int, float, bool)) or obj is None:
        return True
    if isinstance(obj, (tuple, list)):
        return all(_leaves_ok(o) for o in obj)
    if isinstance(obj, Mapping):
        return all(_leaves_ok(o) for o in obj.values())
    return False


def _convert(obj: Any) -> Any:
    obj = _tensor(obj)
    if isinstance(obj, (tuple, list)):
        return tuple(_tensor(o) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _tensor(v) for k, v in obj.items()}
    return obj


def model_inputs(batch: Any, index: int, spec: InputSpec) -> Any:
    """:func:`_map_inputs`, then the values checked (:func:`~dsrewrite.refit.batch_checks.check_batch`:
    real, non-empty, finite, the example's channels)."""
    out = _map_inputs(batch, index, spec)
    check_batch(out, index, spec.where, spec.example, BatchError)
    return out


def _map_inputs(batch: Any, index: int, spec: InputSpec) -> Any:
    """The model's inputs for one user ``batch`` (the ``index``-th, for messages).

    Returns a tensor (one input), a tuple (positional inputs) or a dict (keyword inputs).

    Raises:
        BatchError: the batch cannot be mapped (names the index, what was found and what to pass),
            or ``input_fn`` raised.

    Example:
        >>> import torch
        >>> class Two(nn.Module):
        ...     def forward(self, sample, timestep):
        ...         return sample
        >>> x, t = model_inputs((torch.zeros(2, 4, 8, 8), torch.ones(2), "target"), 0, input_spec(Two()))
        >>> tuple(x.shape), tuple(t.shape)
        ((2, 4, 8, 8), (2,))
        >>> model_inputs(("a.png",), 3, input_spec(nn.Identity()))
        Traceback (most recent call last):
        ...
        dsrewrite.refit.batches.BatchError: calibration batch 3 is a tuple of 1: (str); the model takes 1 positional input and the batch's first element must be it (a tensor). Hint: pass input_key=<key of the input in a dict batch> or input_fn=<function: batch -> model inputs>; from the CLI, torch.save each batch's model inputs (a tensor, or a tuple for several inputs). See docs/data.md.
    """
    where, n = spec.where, spec.positional
    found = _describe(batch)
    takes = f"the model takes {n} positional input{'s' if n != 1 else ''}"
    if spec.input_fn is not None:
        try:
            out = spec.input_fn(batch)
        except Exception as exc:  # noqa: BLE001 - user code: report it as bad input, with the batch
            raise BatchError(f"{where} batch {index}: input_fn raised {type(exc).__name__}: {exc} "
                             f"(the batch is a {found}).") from exc
        out = _convert(out)
        if not (isinstance(out, (Tensor, tuple, Mapping)) and _leaves_ok(out)):
            raise BatchError(f"{where} batch {index}: input_fn returned {_describe(out)}; it must return a tensor, "
                             "a tuple of positional inputs or a dict of keyword inputs (tensors or numbers).")
        return out
    batch = _tensor(batch)
    if isinstance(batch, Tensor):
        if n > 1:
            raise BatchError(
                f"{where} batch {index} is one tensor {tuple(batch.shape)}, but {takes}. Hint: give each batch as a "
                f"tuple of the {n} inputs (from the CLI: torch.save a list of such tuples), or pass input_fn."
            )
        return batch
    if isinstance(batch, Mapping):
        if spec.input_key is not None:
            if spec.input_key not in batch:
                keys = [str(k) for k in batch]
                raise BatchError(
                    f"{where} batch {index} is a {found} and has no input_key {spec.input_key!r}"
                    f"{did_you_mean(str(spec.input_key), keys)}. Hint: pass one of its keys as input_key."
                )
            inner = InputSpec(n, spec.keywords, spec.kwargs_example, None, None, where)
            return _map_inputs(batch[spec.input_key], index, inner)
        names = [str(k) for k in batch]
        if (spec.kwargs_example or spec.keywords is None or all(k in spec.keywords for k in names)) \
                and _leaves_ok(dict(batch)):
            return _convert(batch)
        raise BatchError(
            f"{where} batch {index} is a {found}, which are not all parameters of the model's forward "
            f"{list(spec.keywords or ())}; say which key holds the input. {_HINT}"
        )
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise BatchError(f"{where} batch {index} is an empty {type(batch).__name__}. {_HINT}")
        first = _tensor(batch[0])
        if n == 1:
            if isinstance(first, Tensor):
                return first
            raise BatchError(f"{where} batch {index} is a {found}; {takes} and the batch's first element "
                             f"must be it (a tensor). {_HINT}")
        if isinstance(first, (tuple, list)) and len(first) == n and _leaves_ok(list(first)):
            return _convert(first)
        if len(batch) >= n and _leaves_ok(list(batch[:n])) and isinstance(first, Tensor):
            return _convert(batch[:n])
        raise BatchError(f"{where} batch {index} is a {found}; {takes}, so a batch must start with {n} "
                         f"tensors/numbers (or hold them as its first element). {_HINT}")
    raise BatchError(f"{where} batch {index} is a {found}; expected a tensor, a tuple/list whose first element "
                     f"is the input, or a dict. {_HINT}")


def check_iterable(batches: Any, where: str) -> None:
    """Refuse data that is not an iterable of batches (one tensor, a dict, a string).

    Raises:
        BatchError: with what was passed and how to wrap it.

    Example:
        >>> import torch
        >>> check_iterable(torch.zeros(2, 3), "heal")
        Traceback (most recent call last):
        ...
        dsrewrite.refit.batches.BatchError: heal data must be an iterable of batches (a list of tensors, a DataLoader), got Tensor(2, 3). Hint: wrap one tensor batch in a list: [x].
    """
    if isinstance(batches, (Tensor, Mapping, str, bytes)) or not isinstance(batches, Iterable):
        raise BatchError(
            f"{where} data must be an iterable of batches (a list of tensors, a DataLoader), got "
            f"{_describe(batches)}. Hint: wrap one tensor batch in a list: [x]."
        )


def iter_inputs(batches: Iterable[Any], spec: InputSpec) -> Iterator[Any]:
    """:func:`model_inputs` of every batch of ``batches`` (an iterable: list, DataLoader, generator).

    Raises:
        BatchError: ``batches`` is not iterable, or a batch cannot be mapped.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.zeros(5, 3, 4, 4), torch.zeros(5)), batch_size=2)
        >>> [tuple(x.shape) for x in iter_inputs(loader, input_spec(nn.Identity()))]
        [(2, 3, 4, 4), (2, 3, 4, 4), (1, 3, 4, 4)]
    """
    check_iterable(batches, spec.where)
    for i, b in enumerate(batches):
        yield model_inputs(b, i, spec)


def batch_size_of(inputs: Any) -> int:
    """Samples in one batch of model inputs: dim 0 of its first tensor (1 if there is none).

    Example:
        >>> import torch
        >>> batch_size_of((torch.zeros(4, 3, 2, 2), torch.zeros(4))), batch_size_of(torch.tensor(1.0))
        (4, 1)
    """
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    if isinstance(inputs, (tuple, list)) and inputs:
        return batch_size_of(inputs[0])
    if isinstance(inputs, Mapping) and inputs:
        return batch_size_of(next(iter(inputs.values())))
    return 1


def first_samples(inputs: Any, n: int) -> Any:
    """The first ``n`` samples of one batch of model inputs: every tensor leaf whose dim 0 is the batch size
    (:func:`batch_size_of`) sliced to ``[:n]``, other leaves kept; the batch itself when ``n`` covers it.

    Example:
        >>> import torch
        >>> x = first_samples({"img": torch.zeros(8, 3), "scale": 2.0}, 3)
        >>> x["img"].shape[0], x["scale"]
        (3, 2.0)
    """
    size = batch_size_of(inputs)
    if n >= size:
        return inputs

    def cut(obj: Any) -> Any:
        if isinstance(obj, Tensor):
            return obj[:n] if obj.dim() and obj.shape[0] == size else obj
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*(cut(v) for v in obj))
        if isinstance(obj, (tuple, list)):
            return type(obj)(cut(v) for v in obj)
        if isinstance(obj, Mapping):
            return type(obj)((k, cut(v)) for k, v in obj.items())  # type: ignore[call-arg]
        return obj

    return cut(inputs)


def to_device(inputs: Any, device: torch.device) -> Any:
    """``inputs`` (a tensor, or tensors nested in tuples/lists/dicts) moved to ``device``; other leaves kept.

    Example:
        >>> import torch
        >>> to_device((torch.zeros(1), 3), torch.device("cpu"))
        (tensor([0.]), 3)
    """
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(b, device) for b in inputs)
    if isinstance(inputs, Mapping):
        return {k: to_device(v, device) for k, v in inputs.items()}
    return inputs
