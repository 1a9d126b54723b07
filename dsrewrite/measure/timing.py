# SPDX-License-Identifier: Apache-2.0
"""Per-conv latency measurements that the planner uses (latency-aware selection, measured auto order).

Every measurement times copies of a single conv and its candidate replacement at
the conv's real input shape, on the conv's device and dtype, with the same
interleaved method as the report's ``--benchmark`` (:func:`dsrewrite.latency.compare_latency`:
A B A B ..., medians of per-round ratios). The user's modules are never run or changed.

Example:
    >>> from torch import nn
    >>> from dsrewrite.plan_types import LayerConfig
    >>> r = time_dense_vs_separable(nn.Conv2d(16, 16, 3, padding=1), LayerConfig(), (1, 16, 16, 16), rounds=3, warmup=1)
    >>> sorted(r)
    ['dense_ms', 'ratio', 'separable_ms']
"""

from __future__ import annotations

import copy
import statistics
from typing import Optional, Sequence

import torch
from torch import nn

from ..kinds import get_kind
from .latency import compare_latency
from ..planning.types import LayerConfig

__all__ = ["time_dense_vs_separable", "time_orders", "time_candidates", "ratio_key"]


def _input(conv: nn.Conv2d, shape: Sequence[int]) -> torch.Tensor:
    w = conv.weight
    g = torch.Generator().manual_seed(0)
    return torch.randn(tuple(int(s) for s in shape), generator=g).to(device=w.device, dtype=w.dtype)


def _block(conv: nn.Conv2d, order: str, m: int, cfg: Optional[LayerConfig] = None) -> nn.Module:
    # random init: only the speed matters here, and it skips the SVD
    config = LayerConfig(order=order, depth_multiplier=m, init="random",
                         mid_norm=cfg.mid_norm if cfg else None, mid_act=cfg.mid_act if cfg else None)
    return get_kind(order).build(conv, config).eval()


def time_dense_vs_separable(
    conv: nn.Conv2d,
    cfg: LayerConfig,
    input_shape: Sequence[int],
    *,
    rounds: int = 15,
    warmup: int = 3,
    channels_last: bool = False,
) -> dict[str, float]:
    """Median times (ms) of the dense conv and of its replacement, and their ratio (separable / dense).

    ``ratio < 1`` means the separable block is faster; the speedup is ``1 / ratio``.
    """
    dense = copy.deepcopy(conv).eval()
    sep = _block(dense, cfg.order, cfg.depth_multiplier, cfg)
    cmp = compare_latency(dense, sep, _input(conv, input_shape), rounds=rounds, warmup=warmup,
                          channels_last=channels_last)
    return {"dense_ms": cmp.median_a_ms, "separable_ms": cmp.median_b_ms, "ratio": cmp.ratio}


def ratio_key(name: str, names: Sequence[str]) -> str:
    """Key of kind ``name``'s time ratio to the first of ``names`` in :func:`time_orders`'s result.

    Example:
        >>> ratio_key("pw_dw", ["dw_pw", "pw_dw"])
        'order_ratio'
    """
    return "order_ratio" if len(names) == 2 else f"{name}_ratio"


def time_orders(
    conv: nn.Conv2d,
    ranks: dict[str, int],
    input_shape: Sequence[int],
    *,
    rounds: int = 15,
    warmup: int = 3,
    channels_last: bool = False,
) -> dict[str, float]:
    """Median times (ms) of the blocks of the kinds in ``ranks`` (name → rank), each timed against the first.

    Keys: ``<kind>_ms`` for each kind; with two kinds ``order_ratio`` = second / first,
    with more ``<kind>_ratio`` for each kind after the first.

    Example:
        >>> r = time_orders(nn.Conv2d(32, 8, 3, padding=1), {"dw_pw": 1, "pw_dw": 1}, (1, 32, 8, 8), rounds=3)
        >>> sorted(r)
        ['dw_pw_ms', 'order_ratio', 'pw_dw_ms']
    """
    dense = copy.deepcopy(conv).eval()
    names = list(ranks)
    if len(names) < 2:
        raise ValueError(f"time_orders needs at least two kinds, got {names}")
    first = _block(dense, names[0], ranks[names[0]])
    out: dict[str, float] = {}
    for name in names[1:]:
        cmp = compare_latency(first, _block(dense, name, ranks[name]), _input(conv, input_shape), rounds=rounds,
                              warmup=warmup, channels_last=channels_last)
        out.setdefault(f"{names[0]}_ms", cmp.median_a_ms)
        out[f"{name}_ms"] = cmp.median_b_ms
        out[ratio_key(name, names)] = cmp.ratio
    return out


def time_candidates(
    conv: nn.Module,
    candidates: Sequence[tuple[str, int]],
    input_shape: Sequence[int],
    *,
    cfg: Optional[LayerConfig] = None,
    rounds: int = 5,
    warmup: int = 1,
    channels_last: bool = False,
) -> tuple[float, list[float]]:
    """Median times (ms) of the dense conv and of each ``(kind, m)`` block, each block timed against the dense conv.

    Each block gets its own interleaved run against the dense conv (``rounds`` rounds, dense then block).
    The dense time is the median over all those runs' dense calls; a block's time is that median ×
    the median of its per-round ratios (block / dense), so that drifts of the machine between runs
    cancel. ``cfg`` gives ``mid_norm``/``mid_act`` of the blocks. Returns ``(dense_ms, [block ms, ...])``.

    Example:
        >>> d, t = time_candidates(nn.Conv2d(8, 8, 3, padding=1), [("dw_pw", 1), ("dw_pw", 2)], (1, 8, 8, 8), rounds=2)
        >>> d > 0, len(t), all(v > 0 for v in t)
        (True, 2, True)
    """
    dense = copy.deepcopy(conv).eval()
    x = _input(dense, input_shape)
    dense_times: list[float] = []
    ratios: list[float] = []
    for kind, m in candidates:
        cmp = compare_latency(dense, _block(dense, kind, m, cfg), x, rounds=rounds, warmup=warmup,
                              channels_last=channels_last)
        dense_times.extend(cmp.times_a_ms)
        ratios.append(cmp.ratio)
    if not dense_times:  # no candidate: time the dense conv alone
        dense_times.extend(compare_latency(dense, dense, x, rounds=rounds, warmup=warmup,
                                           channels_last=channels_last).times_a_ms)
    dense_ms = statistics.median(dense_times)
    return dense_ms, [dense_ms * r for r in ratios]
