# SPDX-License-Identifier: Apache-2.0
"""A budget as a validated, frozen record: what the user asked the planner to fit.

Keys (the same in Python ``budget={...}``, a recipe's ``budget:`` section and the CLI's
``--target-*``/``--max-error`` options):

* ``macs``: the whole model's MACs at the example input (batch included), as counted by
  :mod:`dsrewrite.measure.macs`; a value ≤ 1 is a fraction of the original model's MACs.
* ``params``: the whole model's parameter count; a value ≤ 1 is a fraction of the original's.
* ``latency_ms``: the whole model's measured latency at the example input, in milliseconds; a value
  ≤ 1 is a fraction of the dense model's latency measured at planning time
  (:mod:`dsrewrite.budget.latency_costs`).
* ``max_error``: a ceiling on the predicted relative L2 output error (``‖ŷ − y‖ / ‖y‖``, so
  always a fraction, e.g. ``0.05``). Alone: the fewest MACs whose predicted error is under it.
  With ``macs``, ``params`` or ``latency_ms``: the most accurate plan within the cost, refused when
  even that one's predicted error is above the ceiling.

Example:
    >>> b = parse_budget({"macs": 0.5})
    >>> b.macs, b.is_fraction("macs"), b.absolute("macs", 1000)
    (0.5, True, 500)
    >>> parse_budget({"mac": 3e9})
    Traceback (most recent call last):
    ...
    dsrewrite.budget.types.BudgetError: budget: unknown key 'mac' (did you mean 'macs'?); valid keys: macs, params, latency_ms, max_error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..errors import UsageError, did_you_mean

__all__ = ["Budget", "BudgetError", "BUDGET_KEYS", "parse_budget"]

#: The budget keys, in the order they are documented.
BUDGET_KEYS: tuple[str, ...] = ("macs", "params", "latency_ms", "max_error")


class BudgetError(UsageError):
    """A budget that is malformed or cannot be met (exit 2)."""


@dataclass(frozen=True)
class Budget:
    """A validated budget (see the module doc for the meaning of each key; ``None``: not set).

    ``source`` names where it came from (``"budget"``, ``"recipe r.yaml: budget"``, ``"--target-macs"``)
    for messages.
    """

    macs: Optional[float] = None
    params: Optional[float] = None
    latency_ms: Optional[float] = None
    max_error: Optional[float] = None
    source: str = "budget"

    @property
    def cost_key(self) -> Optional[str]:
        """The bounded cost (``"macs"``, ``"params"``, ``"latency_ms"``), or ``None`` for an error ceiling alone."""
        if self.latency_ms is not None:
            return "latency_ms"
        return "macs" if self.macs is not None else "params" if self.params is not None else None

    def is_fraction(self, key: str) -> bool:
        """Whether ``key``'s value is a fraction of the whole model (a value ≤ 1)."""
        v = getattr(self, key)
        return v is not None and key in ("macs", "params", "latency_ms") and v <= 1

    def absolute(self, key: str, whole: int) -> int:
        """``key``'s value as an absolute count, given the original model's ``whole`` count (floored)."""
        v = getattr(self, key)
        if v is None:
            raise KeyError(key)
        return int(math.floor(v * whole)) if self.is_fraction(key) else int(math.floor(v))

    def describe(self) -> str:
        """One line: the keys that are set."""
        parts = []
        for k in BUDGET_KEYS:
            v = getattr(self, k)
            if v is None:
                continue
            if k == "max_error":
                parts.append(f"max_error {v:g}")
            elif self.is_fraction(k):
                whole = "dense model's latency" if k == "latency_ms" else "model"
                parts.append(f"{k} {v:g} of the {whole}")
            else:
                parts.append(f"{k} {v:,.0f}" if k != "latency_ms" else f"latency {v:g} ms")
        return ", ".join(parts) or "none"


def _number(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BudgetError(f"{source}: {key} must be a number, got {value!r} ({type(value).__name__}).")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise BudgetError(f"{source}: {key} must be a finite number > 0, got {value!r}.")
    return v


def parse_budget(value: Any, *, source: str = "budget") -> Optional[Budget]:
    """A :class:`Budget` from a mapping (``None`` and ``{}`` give ``None``; a ``Budget`` is returned as is).

    Raises:
        BudgetError: not a mapping, an unknown key (with "did you mean"), a value that is not a finite
            number > 0, two costs together (``macs``, ``params``, ``latency_ms``: give one), or
            ``max_error`` ≥ 1 (a relative error of 1 is the zero output).

    Example:
        >>> parse_budget({"params": 2e6, "max_error": 0.1}).cost_key
        'params'
        >>> parse_budget({"macs": -1})
        Traceback (most recent call last):
        ...
        dsrewrite.budget.types.BudgetError: budget: macs must be a finite number > 0, got -1.
    """
    if value is None or isinstance(value, Budget):
        return value
    if not isinstance(value, Mapping):
        raise BudgetError(f"{source}: expected a mapping of {', '.join(BUDGET_KEYS)}, got {value!r}.")
    if not value:
        return None
    vals: dict[str, float] = {}
    for key, v in value.items():
        if key not in BUDGET_KEYS:
            raise BudgetError(f"{source}: unknown key {key!r}{did_you_mean(key, BUDGET_KEYS)}; valid keys: "
                              f"{', '.join(BUDGET_KEYS)}.")
        if v is None:
            continue
        vals[key] = _number(v, key, source)
    costs = [k for k in ("macs", "params", "latency_ms") if k in vals]
    if len(costs) > 1:
        got = " and ".join(f"{k} {vals[k]:g}" for k in costs)
        raise BudgetError(f"{source}: give one cost target (macs, params or latency_ms), not "
                          f"{'both' if len(costs) == 2 else 'several'} (got {got}).")
    if "max_error" in vals and vals["max_error"] >= 1:
        raise BudgetError(f"{source}: max_error is a relative output error (e.g. 0.05); got {vals['max_error']:g} "
                          "(≥ 1 allows any output).")
    return Budget(**vals, source=source) if vals else None
