# SPDX-License-Identifier: Apache-2.0
"""The report's records: :class:`Report` and its rows, and their stable JSON form (:meth:`Report.to_dict`).

Example:
    >>> c = Cost(params=10, macs=100)
    >>> c.flops, (c - Cost(4, 40)).to_dict()
    (200, {'params': 6, 'macs': 60, 'flops': 120})
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..fidelity import Fidelity
from ..latency import LatencyComparison
from ..macs import NOT_COUNTED

__all__ = ["REPORT_SCHEMA_VERSION", "UNITS", "Cost", "LayerRow", "RegionRow", "Report", "reduction", "finite"]

#: Version of the JSON schema of :meth:`Report.to_dict` (see docs/report.md).
REPORT_SCHEMA_VERSION = 2

UNITS = {
    "macs": "multiply-accumulates of conv and linear layers (bias excluded) for one forward on input_shape",
    "flops": "FLOPs = 2×MACs",
    "params": "parameter count (bias included)",
}


@dataclass(frozen=True)
class Cost:
    """Params and MACs of a part of a model (FLOPs = 2×MACs)."""

    params: int
    macs: int

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def __sub__(self, other: "Cost") -> "Cost":
        return Cost(self.params - other.params, self.macs - other.macs)

    def to_dict(self) -> dict[str, int]:
        return {"params": self.params, "macs": self.macs, "flops": self.flops}


def reduction(before: int, after: int) -> dict[str, Optional[float]]:
    """``{"factor": before/after, "percent": 100·(before−after)/before}``; ``None`` where undefined.

    Example:
        >>> reduction(231211008, 27496448)["factor"] > 8.4, reduction(0, 0)
        (True, {'factor': None, 'percent': None})
    """
    return {
        "factor": before / after if after else None,
        "percent": 100.0 * (before - after) / before if before else None,
    }


def _reductions(before: Cost, after: Cost) -> dict[str, dict[str, Optional[float]]]:
    return {"params": reduction(before.params, after.params), "macs": reduction(before.macs, after.macs)}


@dataclass(frozen=True)
class LayerRow:
    """One conv of the plan: replaced or skipped (with the reason), and its cost before and after."""

    name: str
    region: str
    replaced: bool
    reason: str
    config: Optional[dict[str, Any]]
    before: Cost
    after: Cost
    kind_before: str
    kind_after: str
    input_shape: Optional[tuple[int, ...]] = None
    output_shape: Optional[tuple[int, ...]] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "region": self.region,
            "replaced": self.replaced,
            "action": "replace" if self.replaced else "skip",
            "reason": self.reason,
            "config": self.config,
            "kind_before": self.kind_before,
            "kind_after": self.kind_after,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            "output_shape": list(self.output_shape) if self.output_shape is not None else None,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "reduction": _reductions(self.before, self.after),
        }


@dataclass(frozen=True)
class RegionRow:
    """A top-level child of the model: all its params and conv+linear MACs, before and after."""

    name: str
    before: Cost
    after: Cost

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "reduction": _reductions(self.before, self.after),
        }


@dataclass
class Report:
    """Everything :func:`build_report` measured. ``kind`` is ``"rewrite"`` or ``"model"`` (no rewrite).

    ``other_*`` is what lies outside the plan's layers, so that
    ``totals == Σ layers + other``. ``fidelity`` maps ``"example"`` /
    ``"calibration"`` to a :class:`~dsrewrite.fidelity.Fidelity`; ``latency`` maps
    ``"eager_nchw"`` / ``"channels_last"`` to a
    :class:`~dsrewrite.latency.LatencyComparison`. ``calibration`` may be set by
    the caller to a calibration result (anything with ``to_dict()``).
    """

    kind: str
    model: str
    recipe: str
    capture: str
    input_shape: Optional[tuple[int, ...]]
    layers: tuple[LayerRow, ...]
    regions: tuple[RegionRow, ...]
    totals_before: Cost
    totals_after: Cost
    other_before: Cost
    other_after: Cost
    plan_notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    fidelity: dict[str, Fidelity] = field(default_factory=dict)
    latency: dict[str, LatencyComparison] = field(default_factory=dict)
    calibration: Any = None
    task: Any = None  # a TaskScores (dsrewrite.measure.task) when the caller gave a task metric

    @property
    def mac_ratio(self) -> Optional[float]:
        """MACs after / MACs before (``None`` when the model has no MACs)."""
        return self.totals_after.macs / self.totals_before.macs if self.totals_before.macs else None

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON-ready form (see ``docs/report.md``); non-finite floats become ``None``.

        Wall-clock measurements are kept apart, so that identical runs give identical JSON
        outside them: ``"timing"`` (how long calibration took) and ``"latency"`` (only with
        ``benchmark=True``).
        """
        d: dict[str, Any] = {
            "schema_version": REPORT_SCHEMA_VERSION,
            "kind": self.kind,
            "model": self.model,
            "recipe": self.recipe,
            "capture": self.capture,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            "units": dict(UNITS),
            "not_counted": NOT_COUNTED,
            "totals": {
                "before": self.totals_before.to_dict(),
                "after": self.totals_after.to_dict(),
                "reduction": _reductions(self.totals_before, self.totals_after),
            },
            "other": {"before": self.other_before.to_dict(), "after": self.other_after.to_dict()},
            "regions": [r.to_dict() for r in self.regions],
            "layers": [r.to_dict() for r in self.layers],
            "counts": {"replaced": sum(r.replaced for r in self.layers),
                       "skipped": sum(not r.replaced for r in self.layers)},
            "plan_notes": list(self.plan_notes),
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "fidelity": {k: self.fidelity[k].to_dict() if k in self.fidelity else None
                         for k in ("example", "calibration")},
            "latency": None,
            "calibration": _plain(self.calibration),
            "task": _plain(self.task),
            "timing": {"calibration_seconds": None},
        }
        if isinstance(d["calibration"], dict) and "seconds" in d["calibration"]:  # wall clock: kept apart
            d["timing"]["calibration_seconds"] = d["calibration"]["seconds"]
            d["calibration"] = {k: v for k, v in d["calibration"].items() if k != "seconds"}
        if self.latency:
            d["latency"] = {k: self.latency[k].to_dict() if k in self.latency else None
                            for k in ("eager_nchw", "channels_last")}
            d["latency"]["mac_ratio"] = self.mac_ratio
        return finite(d)


def _plain(value: Any) -> Any:
    if value is None:
        return None
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
