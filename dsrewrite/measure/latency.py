# SPDX-License-Identifier: Apache-2.0
"""Interleaved A/B latency: medians, and the median of per-round ratios B/A.

Each round times one call of model A, then one of model B, so that drifts of
the machine (frequency scaling, other processes) hit both alike; the ratio of
each round is taken before the median, which is more robust than a ratio of
medians. Calls run in eval mode under ``torch.inference_mode``, with
``torch.cuda.synchronize`` around each call on CUDA.

The caller's models are never changed: train flags are restored, and when the
memory format or the device has to change, copies are timed instead.

Example:
    >>> import torch
    >>> from torch import nn
    >>> m = nn.Conv2d(3, 8, 3)
    >>> r = compare_latency(m, m, torch.randn(1, 3, 16, 16), rounds=5, warmup=1)
    >>> r.rounds, r.ratio > 0
    (5, True)
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..errors import InputShapeError, UsageError
from ..runtime.run import call_model, evaluating, first_tensor, run_model

__all__ = ["LatencyComparison", "compare_latency"]


@dataclass(frozen=True)
class LatencyComparison:
    """Timings in milliseconds. ``ratio`` is the median over rounds of ``time_b / time_a`` (< 1: B is faster)."""

    median_a_ms: float
    median_b_ms: float
    ratio: float
    rounds: int
    warmup: int
    device: str
    channels_last: bool
    times_a_ms: tuple[float, ...]
    times_b_ms: tuple[float, ...]

    @property
    def speedup(self) -> float:
        """``1 / ratio``: how many times faster B is than A."""
        return 1.0 / self.ratio

    def to_dict(self, *, with_times: bool = False) -> dict[str, Any]:
        """A JSON-ready dict; the per-round times only when ``with_times``."""
        d = asdict(self)
        d["times_a_ms"], d["times_b_ms"] = list(self.times_a_ms), list(self.times_b_ms)
        if not with_times:
            del d["times_a_ms"], d["times_b_ms"]
        return d


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4:
        return torch.channels_last
    if x.dim() == 5:
        return torch.channels_last_3d
    raise InputShapeError(
        f"channels_last needs a 4-d (N, C, H, W) or 5-d input, got shape {tuple(x.shape)}. "
        "Hint: time with channels_last=False."
    )


def _prepare_model(model: nn.Module, device: torch.device, fmt: Optional[torch.memory_format]) -> nn.Module:
    if fmt is None and _device_of(model) == device:
        return model
    twin = copy.deepcopy(model).to(device)
    return twin.to(memory_format=fmt) if fmt is not None else twin


def _prepare_input(x: Any, device: torch.device, fmt: Optional[torch.memory_format]) -> Any:
    if isinstance(x, Tensor):
        x = x.to(device)
        return x.contiguous(memory_format=fmt) if fmt is not None and x.dim() >= 4 else x
    if isinstance(x, (tuple, list)):
        return type(x)(_prepare_input(v, device, fmt) for v in x)
    if isinstance(x, dict):
        return {k: _prepare_input(v, device, fmt) for k, v in x.items()}
    return x


def compare_latency(
    model_a: nn.Module,
    model_b: nn.Module,
    example_input: Any,
    *,
    rounds: int = 30,
    warmup: int = 5,
    channels_last: bool = False,
    device: Optional[Union[str, torch.device]] = None,
) -> LatencyComparison:
    """Time ``model_a`` and ``model_b`` interleaved (A B, A B, ...) on ``example_input``.

    ``device`` defaults to ``model_a``'s; a model elsewhere is copied there.
    ``channels_last=True`` times channels_last copies of both models and of the
    input. ``example_input`` is a tensor, a tuple/list of positional arguments
    or a dict of keyword arguments.

    Raises:
        UsageError: ``rounds < 1`` or ``warmup < 0``.
        InputShapeError: ``channels_last`` with an input that is not 4-d or 5-d.

    Example:
        >>> a, b = nn.Linear(64, 64), nn.Linear(64, 8)
        >>> r = compare_latency(a, b, torch.randn(4, 64), rounds=3, warmup=0)
        >>> len(r.times_a_ms), r.median_a_ms > 0, r.device
        (3, True, 'cpu')
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise UsageError(f"compare_latency: rounds must be an int >= 1, got {rounds!r}.")
    if not isinstance(warmup, int) or warmup < 0:
        raise UsageError(f"compare_latency: warmup must be an int >= 0, got {warmup!r}.")
    dev = torch.device(device) if device is not None else _device_of(model_a)
    fmt = None
    if channels_last:
        first = first_tensor(example_input)
        if first is None:
            raise InputShapeError("channels_last needs a tensor input; got none. Hint: pass the input tensor.")
        fmt = _memory_format(first)
    a = _prepare_model(model_a, dev, fmt)
    b = a if model_b is model_a else _prepare_model(model_b, dev, fmt)
    x = _prepare_input(example_input, dev, fmt)
    cuda = dev.type == "cuda"

    def timed(model: nn.Module) -> float:
        if cuda:
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        call_model(model, x)
        if cuda:
            torch.cuda.synchronize(dev)
        return (time.perf_counter() - start) * 1e3

    times_a: list[float] = []
    times_b: list[float] = []
    with evaluating(a, b), torch.inference_mode():
        run_model(a, x)  # a clear error, before timing, when the input does not fit
        run_model(b, x)
        for _ in range(warmup):
            timed(a)
            timed(b)
        for _ in range(rounds):
            times_a.append(timed(a))
            times_b.append(timed(b))
    ratios = [tb / ta if ta > 0 else float("inf") for ta, tb in zip(times_a, times_b)]
    return LatencyComparison(
        median_a_ms=statistics.median(times_a),
        median_b_ms=statistics.median(times_b),
        ratio=statistics.median(ratios),
        rounds=rounds,
        warmup=warmup,
        device=str(dev),
        channels_last=channels_last,
        times_a_ms=tuple(times_a),
        times_b_ms=tuple(times_b),
    )
