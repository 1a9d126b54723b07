# SPDX-License-Identifier: Apache-2.0
"""Is a captured graph the model? Run it on the example inputs and compare with eager.

A graph capture can be wrong without failing: ``torch.fx`` records one branch of Python
control flow, so a test that is False for a ``Proxy`` (MONAI's
``torch.jit.isinstance(x, Tensor)``) leaves a skip concatenation out of the graph. The
capture therefore runs the captured graph once on the example inputs and compares its
outputs with the eager outputs: same structure (tuples, lists, dicts, dataclasses), same
shapes and dtypes, values within a dtype-aware tolerance. Both runs use the same seeded
random stream (:func:`seeded`), so models that draw random numbers compare too.

Example:
    >>> import torch
    >>> ok, why = compare_outputs({"a": torch.ones(2)}, {"a": torch.ones(2) + 1e-7})
    >>> ok, why
    (True, 'max abs diff 1.2e-07')
    >>> compare_outputs((torch.ones(2),), (torch.ones(3),))
    (False, 'output [0]: shape (2,) vs (3,)')
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any, Iterator

import torch
from torch import Tensor

__all__ = ["flatten_outputs", "compare_outputs", "detached", "seeded", "tolerance"]

_SCALARS = (bool, int, float, str, type(None))


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a graph-vs-eager comparison: 256 ulps of ``dtype``, 8 for 16-bit floats.

    The same ops in the same order give the same bits; the margin covers a graph that fuses or
    reorders a few of them. Integer and bool outputs must be equal.

    Example:
        >>> tolerance(torch.float64) < tolerance(torch.float32) < tolerance(torch.bfloat16), tolerance(torch.int64)
        (True, 0.0)
    """
    if not dtype.is_floating_point and not dtype.is_complex:
        return 0.0
    finfo = torch.finfo(dtype if dtype.is_floating_point else torch.float32)
    return (8 if finfo.bits <= 16 else 256) * finfo.eps


def flatten_outputs(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` for every tensor or scalar leaf of a model output, in a fixed order.

    Example:
        >>> [p for p, _ in flatten_outputs({"x": [torch.ones(1), 2], "y": None})]
        ['[x][0]', '[x][1]', '[y]']
    """
    if isinstance(obj, Tensor) or isinstance(obj, _SCALARS):
        yield path, obj
    elif isinstance(obj, Mapping):
        for k in obj:
            yield from flatten_outputs(obj[k], f"{path}[{k}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flatten_outputs(v, f"{path}[{i}]")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from flatten_outputs(getattr(obj, f.name), f"{path}.{f.name}")
    else:
        yield path, type(obj).__name__  # opaque: its type must match


def compare_outputs(ref: Any, got: Any) -> tuple[bool, str]:
    """Whether ``got`` reproduces the eager output ``ref``; the max abs diff, or the first difference.

    Tensors match when shapes and dtypes agree and ``max|got - ref| <= tol · max(1, max|ref|)``
    (:func:`tolerance` of the dtype); NaNs must sit at the same places.
    """
    a, b = list(flatten_outputs(ref)), list(flatten_outputs(got))
    if [p for p, _ in a] != [p for p, _ in b]:
        return False, f"output structure differs ({len(a)} leaves vs {len(b)})"
    worst = 0.0
    for (path, x), (_, y) in zip(a, b):
        where = f"output {path or '(single)'}"
        if isinstance(x, Tensor) != isinstance(y, Tensor):
            return False, f"{where}: {type(x).__name__} vs {type(y).__name__}"
        if not isinstance(x, Tensor):
            if x != y and not (isinstance(x, float) and x != x and y != y):
                return False, f"{where}: {x!r} vs {y!r}"
            continue
        if tuple(x.shape) != tuple(y.shape):
            return False, f"{where}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if x.dtype != y.dtype:
            return False, f"{where}: dtype {x.dtype} vs {y.dtype}"
        if x.numel() == 0:
            continue
        xd, yd = x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)
        if not torch.equal(torch.isnan(xd), torch.isnan(yd)):
            return False, f"{where}: NaNs at different places"
        xd, yd = torch.nan_to_num(xd), torch.nan_to_num(yd)
        diff = float((xd - yd).abs().max())
        bound = tolerance(x.dtype) * max(1.0, float(xd.abs().max()))
        if diff > bound:
            return False, f"{where}: max abs diff {diff:.3g} > {bound:.3g}"
        worst = max(worst, diff)
    return True, f"max abs diff {worst:.2g}"


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Run a block on a fixed random stream (CPU and CUDA), restoring the caller's RNG state after."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def detached(obj: Any) -> Any:
    """``obj`` with every tensor in plain lists, tuples and dicts detached (other containers as they are)."""
    if isinstance(obj, Tensor):
        return obj.detach()
    if type(obj) is dict:
        return {k: detached(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(detached(v) for v in obj)
    return obj
