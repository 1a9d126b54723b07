# SPDX-License-Identifier: Apache-2.0
"""Measuring: what a rewrite costs and changes.

* :mod:`~dsrewrite.measure.macs`: MAC and parameter counts from shapes, cross-checked with ``FlopCounterMode``;
* :mod:`~dsrewrite.measure.fidelity`: output comparison (relative L2, cosine, argmax agreement);
* :mod:`~dsrewrite.measure.latency`: interleaved A/B timing, medians of per-round ratios;
* :mod:`~dsrewrite.measure.timing`: per-conv timings for latency-aware selection and ``auto_order: measured``.

``dsrewrite.measure`` was the per-conv timing module until 0.1; its names
(``time_dense_vs_separable``, ``time_orders``, ``ratio_key``) stay importable from
here, loaded on first use.
"""

from __future__ import annotations

from typing import Any

_TIMING = ("time_dense_vs_separable", "time_orders", "ratio_key")

__all__ = list(_TIMING)


def __getattr__(name: str) -> Any:
    if name in _TIMING:
        from . import timing

        return getattr(timing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
