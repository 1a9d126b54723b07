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
from typing import Optional, Sequence

import torch
from torch import nn

from .latency import compare_latency
from .layers.dsconv import DepthwiseSeparableConv2d
from .plan_types import LayerConfig

__all__ = ["time_dense_vs_separable", "time_orders"]


def _input(conv: nn.Conv2d, shape: Sequence[int]) -> torch.Tensor:
    w = conv.weight
    g = torch.Generator().manual_seed(0)
    return torch.randn(tuple(int(s) for s in shape), generator=g).to(device=w.device, dtype=w.dtype)


def _block(conv: nn.Conv2d, order: str, m: int, cfg: Optional[LayerConfig] = None) -> nn.Module:
    # random init: only the speed matters here, and it skips the SVD
    return DepthwiseSeparableConv2d.from_conv(
        conv, depth_multiplier=m, order=order, init="random",
        mid_norm=cfg.mid_norm if cfg else None, mid_act=cfg.mid_act if cfg else None,
    ).eval()


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


def time_orders(
    conv: nn.Conv2d,
    ranks: dict[str, int],
    input_shape: Sequence[int],
    *,
    rounds: int = 15,
    warmup: int = 3,
    channels_last: bool = False,
) -> dict[str, float]:
    """Median times (ms) of the ``dw_pw`` and ``pw_dw`` blocks and ``order_ratio`` = pw_dw / dw_pw.

    Example:
        >>> r = time_orders(nn.Conv2d(32, 8, 3, padding=1), {"dw_pw": 1, "pw_dw": 1}, (1, 32, 8, 8), rounds=3)
        >>> sorted(r)
        ['dw_pw_ms', 'order_ratio', 'pw_dw_ms']
    """
    dense = copy.deepcopy(conv).eval()
    a, b = _block(dense, "dw_pw", ranks["dw_pw"]), _block(dense, "pw_dw", ranks["pw_dw"])
    cmp = compare_latency(a, b, _input(conv, input_shape), rounds=rounds, warmup=warmup,
                          channels_last=channels_last)
    return {"dw_pw_ms": cmp.median_a_ms, "pw_dw_ms": cmp.median_b_ms, "order_ratio": cmp.ratio}
