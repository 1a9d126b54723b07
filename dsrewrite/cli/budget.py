# SPDX-License-Identifier: Apache-2.0
"""The budget options of ``apply`` and ``plan`` (``--target-macs`` ...): parsed here, planned by :mod:`dsrewrite.budget`."""

from __future__ import annotations

from typing import Any, Callable, Optional

import click


def budget_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--max-error", type=float, default=None, metavar="E",
                      help="Ceiling on the predicted relative output error (e.g. 0.05): alone, the fewest MACs "
                           "under it; with a target, refused when the target cannot keep it.")(fn)
    fn = click.option("--target-latency", type=float, default=None, metavar="MS",
                      help="Plan for this measured latency of the whole model at the example input, in ms (≤ 1: a "
                           "fraction of the dense model's latency, measured first); every candidate of every "
                           "selected conv is timed on this machine (the recipe's latency: section sets rounds and "
                           "channels_last). apply then measures the result against the dense model.")(fn)
    fn = click.option("--target-params", type=float, default=None, metavar="N",
                      help="Plan for this many parameters in the whole model (≤ 1: a fraction of the original's).")(fn)
    fn = click.option("--target-macs", type=float, default=None, metavar="N",
                      help="Plan for this many MACs in the whole model at the example input (≤ 1: a fraction of "
                           "the original's), choosing dense or kind × multiplier per selected conv; with --calib "
                           "the choice uses the data. See docs/budget.md.")(fn)
    return fn


def budget_of(target_macs: Optional[float], target_params: Optional[float], target_latency: Optional[float],
              max_error: Optional[float]) -> Optional[dict[str, float]]:
    """The ``budget=`` mapping of the options given (``None`` when none is), checked by the API."""
    given = {"macs": target_macs, "params": target_params, "latency_ms": target_latency, "max_error": max_error}
    out = {k: v for k, v in given.items() if v is not None}
    return out or None
