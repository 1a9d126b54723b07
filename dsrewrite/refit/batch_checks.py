# SPDX-License-Identifier: Apache-2.0
"""Values of one batch of model inputs, checked before use: real, non-empty, finite, the model's channels.

NaN in calibration data used to surface as "linalg.eigh failed to converge" (exit 1) and a
wrong channel count as a shape error deep inside a forward; here each is one
:class:`~dsrewrite.refit.batches.BatchError` (a ``UsageError``) naming the batch.

Example:
    >>> import torch
    >>> check_batch(torch.zeros(2, 3, 8, 8), 0, "calibration", torch.zeros(1, 3, 8, 8))
    >>> x = torch.zeros(2, 3, 8, 8); x[1, 0, 0, 0] = float("nan")
    >>> check_batch(x, 4, "calibration")
    Traceback (most recent call last):
    ...
    dsrewrite.errors.UsageError: calibration batch 4 holds NaN (1 of 384 values); clean the data (e.g. torch.nan_to_num) or drop the sample.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import torch
from torch import Tensor

from ..errors import UsageError

__all__ = ["check_batch"]


def _leaves(obj: Any, label: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, Tensor):
        yield label, obj
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{label}[{i}]")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _leaves(v, f"{label}[{k!r}]")


def _example_at(example: Any, label: str) -> Optional[Tensor]:
    for lab, t in _leaves(example):
        if lab == label:
            return t
    return None


def check_batch(inputs: Any, index: int, where: str, example: Any = None,
                error: type[UsageError] = UsageError) -> None:
    """Refuse a batch of model inputs with a complex, empty or non-finite tensor, or other channels than ``example``.

    ``example`` (the example inputs, same structure) gives the channel count (dim 1) of each
    input of 3 or more dims; other inputs (timesteps, masks) are checked for values only.

    Raises:
        UsageError: (``error``) naming the batch index, the input and what is wrong.
    """
    for label, t in _leaves(inputs):
        what = f"{where} batch {index}{label}"
        if t.is_complex():
            raise error(f"{what} is complex ({t.dtype}); the model takes real numbers.")
        if t.numel() == 0:
            raise error(f"{what} is empty (shape {tuple(t.shape)}); give at least one sample per batch.")
        if t.is_floating_point():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                nan = bool(torch.isnan(t).any())
                kinds = "NaN" if nan and not bool(torch.isinf(t).any()) else "inf" if not nan else "NaN and inf"
                raise error(f"{what} holds {kinds} ({int((~finite).sum())} of {t.numel()} values); clean the data "
                            "(e.g. torch.nan_to_num) or drop the sample.")
        ref = _example_at(example, label) if example is not None else None
        if ref is not None and ref.dim() >= 3:
            if t.dim() != ref.dim() or t.shape[1] != ref.shape[1]:
                raise error(f"{what} has shape {tuple(t.shape)}, but the model takes {ref.dim()}-d inputs with "
                            f"{ref.shape[1]} channels (dim 1), like the example input {tuple(ref.shape)}.")
