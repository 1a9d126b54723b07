"""The report of a rewrite: what was replaced, what it cost before and after, how close the outputs stay.

:func:`build_report` measures both models on the example input (see
:mod:`dsrewrite.macs` for what is counted: conv and linear MACs, bias excluded;
FLOPs = 2×MACs), groups the costs per plan layer, per region (top-level child)
and in total, compares outputs (:mod:`dsrewrite.fidelity`) and, on request,
latency (:mod:`dsrewrite.latency`). Renderings: :meth:`Report.to_dict` (a
stable JSON schema, ``schema_version`` :data:`REPORT_SCHEMA_VERSION`, described
in ``docs/report.md``), :func:`render_table` (terminal), :func:`render_markdown`,
:func:`save_report` (``.json`` / ``.md`` / ``.txt``) and :func:`save_plot` (PNG).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dsrewrite.layers import DepthwiseSeparableConv2d
    >>> from dsrewrite.plan_types import LayerConfig, Plan, PlanEntry
    >>> model = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1, bias=False))
    >>> rewritten = nn.Sequential(DepthwiseSeparableConv2d.from_conv(model[0]))
    >>> plan = Plan(entries=(PlanEntry("0", "replace", "3×3", LayerConfig()),), recipe="all_3x3", capture="fx")
    >>> rep = build_report(model, rewritten, plan, torch.randn(1, 64, 56, 56))
    >>> rep.totals_before.macs, rep.totals_after.macs, rep.totals_after.params
    (231211008, 27496448, 8768)
    >>> round(rep.to_dict()["totals"]["reduction"]["macs"]["factor"], 2)
    8.41
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from torch import Tensor, nn

from .errors import OutputError, UsageError, did_you_mean
from .fidelity import Fidelity, compare_outputs
from .latency import LatencyComparison, compare_latency
from .macs import NOT_COUNTED, ModelCosts, layer_costs, measure, region_costs, region_of
from .plan_types import Plan
from .predicates import predicates

__all__ = [
    "REPORT_SCHEMA_VERSION",
    "Cost",
    "LayerRow",
    "RegionRow",
    "Report",
    "PlotUnavailableError",
    "build_report",
    "build_plan_report",
    "build_inventory",
    "render_inventory",
    "render_table",
    "render_markdown",
    "save_report",
    "save_plot",
    "reduction",
]

#: Version of the JSON schema of :meth:`Report.to_dict` (see docs/report.md).
REPORT_SCHEMA_VERSION = 1

UNITS = {
    "macs": "multiply-accumulates of conv and linear layers (bias excluded) for one forward on input_shape",
    "flops": "FLOPs = 2×MACs",
    "params": "parameter count (bias included)",
}


class PlotUnavailableError(UsageError):
    """``save_plot`` needs matplotlib, which is not installed."""


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------
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

    @property
    def mac_ratio(self) -> Optional[float]:
        """MACs after / MACs before (``None`` when the model has no MACs)."""
        return self.totals_after.macs / self.totals_before.macs if self.totals_before.macs else None

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON-ready form (see ``docs/report.md``); non-finite floats become ``None``."""
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
        }
        if self.latency:
            d["latency"] = {k: self.latency[k].to_dict() if k in self.latency else None
                            for k in ("eager_nchw", "channels_last")}
            d["latency"]["mac_ratio"] = self.mac_ratio
        return _finite(d)


def _plain(value: Any) -> Any:
    if value is None:
        return None
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------
def _shape(value: Any) -> Optional[tuple[int, ...]]:
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else None


def _check_warnings(before: ModelCosts, after: Optional[ModelCosts]) -> list[str]:
    wa = before.check.warning if before.check else None
    wb = after.check.warning if after is not None and after.check else None
    if after is None:
        return [wa] if wa else []
    if wa and wa == wb:
        return [f"both models: {wa}"]
    return [f"{who} model: {w}" for who, w in (("original", wa), ("rewritten", wb)) if w]


def build_report(
    original: nn.Module,
    rewritten: nn.Module,
    plan: Plan,
    example_inputs: Any,
    *,
    calibration_inputs: Optional[Iterable[Any]] = None,
    benchmark: bool = False,
    benchmark_rounds: int = 20,
    benchmark_warmup: int = 3,
) -> Report:
    """Measure ``original`` and ``rewritten`` on ``example_inputs`` and report per plan layer, region and total.

    ``build_report(model, model, plan, x)`` (the same object twice) gives a
    "model only" report: before == after, no fidelity, no latency. Fidelity is
    measured on ``example_inputs`` (one batch: a tensor, a tuple of positional
    args or a dict of kwargs) and, when given, on ``calibration_inputs`` (an
    iterable of batches). ``benchmark=True`` times both models interleaved, eager
    NCHW and channels_last, ``benchmark_rounds`` rounds each. Neither model is changed.

    Raises:
        PlanError: a plan entry names no submodule of the models.
        InputShapeError: a model cannot run on ``example_inputs``.

    Example:
        >>> import torch
        >>> from dsrewrite.plan_types import Plan, PlanEntry
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        >>> p = Plan(entries=(PlanEntry("2", "skip", "not in the decoder"),), recipe="decoder_only", capture="fx")
        >>> rep = build_report(net, net, p, torch.randn(1, 3, 16, 16))
        >>> rep.kind, rep.totals_before == rep.totals_after, rep.layers[0].before.macs
        ('model', True, 82944)
    """
    same = rewritten is original
    costs_a = measure(original, example_inputs)
    costs_b = costs_a if same else measure(rewritten, example_inputs)
    names = list(dict.fromkeys(e.name for e in plan.entries))
    la = layer_costs(original, costs_a, names)
    lb = la if same else layer_costs(rewritten, costs_b, names)

    layers: list[LayerRow] = []
    warnings = _check_warnings(costs_a, None if same else costs_b)
    for e in plan.entries:
        fact = e.fact or {}
        first = costs_a.modules.get(e.name)
        row = LayerRow(
            name=e.name,
            region=str(fact.get("region") or region_of(e.name)),
            replaced=e.replaced,
            reason=e.reason,
            config=dataclasses.asdict(e.config) if e.config is not None else None,
            before=Cost(la[e.name].params, la[e.name].macs),
            after=Cost(lb[e.name].params, lb[e.name].macs),
            kind_before=la[e.name].kind,
            kind_after=lb[e.name].kind,
            input_shape=_shape(fact.get("input_shape")) or (first.input_shape if first else None),
            output_shape=_shape(fact.get("output_shape")) or (first.output_shape if first else None),
        )
        layers.append(row)
        if not same and row.replaced and row.kind_after == row.kind_before:
            warnings.append(
                f"plan says replace {e.name!r} but the rewritten model still holds a {row.kind_after} there. "
                "Hint: apply the plan to the model (dsrewrite.apply.apply_plan) before reporting."
            )
        if not same and not row.replaced and row.after != row.before:
            warnings.append(f"plan says skip {e.name!r} but its cost changed in the rewritten model.")

    def part(lc: dict) -> Cost:
        return Cost(sum(lc[n].params for n in names), sum(lc[n].macs for n in names))

    totals_a = Cost(costs_a.total_params, costs_a.total_macs)
    totals_b = Cost(costs_b.total_params, costs_b.total_macs)
    ra, rb = region_costs(original, costs_a), region_costs(rewritten, costs_b)
    regions = tuple(
        RegionRow(r, Cost(*ra.get(r, (0, 0))), Cost(*rb.get(r, (0, 0))))
        for r in dict.fromkeys([*ra, *rb])
    )

    fidelity: dict[str, Fidelity] = {}
    latency: dict[str, LatencyComparison] = {}
    notes: list[str] = []
    if not same:
        fidelity["example"] = compare_outputs(original, rewritten, [example_inputs])
        if calibration_inputs is not None:
            fidelity["calibration"] = compare_outputs(original, rewritten, calibration_inputs)
        if benchmark:
            kw = {"rounds": benchmark_rounds, "warmup": benchmark_warmup}
            latency["eager_nchw"] = compare_latency(original, rewritten, example_inputs, **kw)
            first_t = example_inputs if isinstance(example_inputs, Tensor) else None
            if first_t is not None and first_t.dim() in (4, 5):
                latency["channels_last"] = compare_latency(
                    original, rewritten, example_inputs, channels_last=True, **kw
                )
            else:
                notes.append("channels_last latency not measured: it needs a single 4-d or 5-d input tensor.")
    elif benchmark:
        notes.append("no latency measured: a model-only report has nothing to compare.")

    return Report(
        kind="model" if same else "rewrite",
        model=type(original).__name__,
        recipe=plan.recipe,
        capture=plan.capture,
        input_shape=costs_a.input_shape,
        layers=tuple(layers),
        regions=regions,
        totals_before=totals_a,
        totals_after=totals_b,
        other_before=totals_a - part(la),
        other_after=totals_b - part(lb),
        plan_notes=tuple(plan.notes),
        warnings=tuple(warnings),
        notes=tuple(notes),
        fidelity=fidelity,
        latency=latency,
    )


def build_plan_report(model: nn.Module, plan: Plan, example_inputs: Any) -> Report:
    """A "model only" report (no rewrite: before == after) of ``model`` with the plan's decisions.

    Example:
        >>> import torch
        >>> from dsrewrite.plan_types import Plan
        >>> rep = build_plan_report(nn.Conv2d(3, 4, 3), Plan((), "all_3x3", "fx"), torch.zeros(1, 3, 5, 5))
        >>> rep.kind, rep.totals_before.macs, [r.name for r in rep.regions]
        ('model', 972, ['(root)'])
    """
    return build_report(model, model, plan, example_inputs)


# --------------------------------------------------------------------------------------
# Inventory (for `dsrewrite inspect`)
# --------------------------------------------------------------------------------------
def build_inventory(model: nn.Module, capture: Any, example_inputs: Any) -> dict[str, Any]:
    """Every conv's captured facts with its params and MACs, as a JSON-ready dict.

    ``capture`` is a :class:`~dsrewrite.facts.Capture` of ``model``.

    Example:
        >>> import torch
        >>> from dsrewrite.capture import capture
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3))
        >>> x = torch.zeros(1, 3, 8, 8)
        >>> inv = build_inventory(net, capture(net, x), x)
        >>> inv["convs"][0]["name"], inv["convs"][0]["macs"], inv["totals"]["params"]
        ('0', 7776, 224)
    """
    costs = measure(model, example_inputs)
    convs = []
    for fact in capture.facts:
        d = fact.to_dict()
        c = costs.modules.get(fact.name)
        d.update(params=c.params if c else None, macs=c.macs if c else None,
                 flops=2 * c.macs if c else None)
        convs.append(d)
    return _finite({
        "schema_version": REPORT_SCHEMA_VERSION,
        "model": type(model).__name__,
        "capture": capture.method,
        "input_shape": list(capture.input_shape) if capture.input_shape is not None else None,
        "units": dict(UNITS),
        "not_counted": NOT_COUNTED,
        "totals": {"params": costs.total_params, "macs": costs.total_macs, "flops": costs.total_flops},
        "convs": convs,
        "functional_convs": list(capture.functional_convs),
        "notes": list(capture.notes),
        "warnings": [costs.check.warning] if costs.check and costs.check.warning else [],
    })


def render_inventory(inv: dict[str, Any]) -> str:
    """A terminal table of :func:`build_inventory`'s result: one line per conv.

    Example:
        >>> import torch
        >>> from dsrewrite.capture import capture
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3))
        >>> x = torch.zeros(1, 3, 8, 8)
        >>> print(render_inventory(build_inventory(net, capture(net, x), x)).splitlines()[0])
        Sequential: 1 convs, capture fx, input (1, 3, 8, 8)
    """

    def flag(v: Any) -> str:
        return "?" if v is None else ("y" if v else "-")

    preds = predicates()
    rows = [("conv", "type", "in→out", "k", "s", "g", "region", "os", *(p.column for p in preds), "params", "MACs")]
    for c in inv["convs"]:
        rows.append((
            c["name"], c["conv_type"], f"{c['in_channels']}→{c['out_channels']}",
            "×".join(map(str, c["kernel_size"])), ",".join(map(str, c["stride"])), str(c["groups"]),
            c["region"], "?" if c.get("output_stride") is None else f"{c['output_stride']:g}",
            *(flag(c.get(p.name)) for p in preds),
            _si(c["params"]), _si(c["macs"]),
        ))
    shape = tuple(inv["input_shape"]) if inv.get("input_shape") else "?"
    t = inv["totals"]
    lines = [
        f"{inv['model']}: {len(inv['convs'])} convs, capture {inv['capture']}, input {shape}",
        _grid(rows),
        f"total: params {t['params']:,}; MACs {t['macs']:,}; FLOPs (= 2×MACs) {t['flops']:,}",
        f"os: output stride; {'/'.join(p.column for p in preds)}: {' / '.join(p.legend for p in preds)} (?: unknown)",
        NOT_COUNTED,
    ]
    lines += [f"functional conv (not replaceable): {f}" for f in inv.get("functional_convs", [])]
    lines += [f"note: {n}" for n in inv.get("notes", [])]
    lines += [f"warning: {w}" for w in inv.get("warnings", [])]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Text renderings
# --------------------------------------------------------------------------------------
def _si(n: Optional[Union[int, float]]) -> str:
    """Compact count: ``231211008 -> '231.2M'``."""
    if n is None:
        return "-"
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.4g}{suf}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def _factor(before: int, after: int) -> str:
    r = reduction(before, after)
    if r["factor"] is None:
        return "-" if not before else "∞"
    return f"{r['factor']:.2f}×"


def _pct(before: int, after: int) -> str:
    """Change from before to after: ``'−88.1%'`` (fewer), ``'+3.0%'`` (more), ``'0.0%'``."""
    p = reduction(before, after)["percent"]
    if p is None:
        return "-"
    if p == 0:
        return "0.0%"
    return f"−{p:.1f}%" if p > 0 else f"+{-p:.1f}%"


def _grid(rows: list[tuple[str, ...]], right: frozenset[int] = frozenset()) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("-" * min(140, len(out[0])))
    return "\n".join(out)


def _config_text(cfg: Optional[dict[str, Any]]) -> str:
    if not cfg:
        return ""
    s = f"{cfg.get('order')} m={cfg.get('depth_multiplier')} init={cfg.get('init')}"
    if cfg.get("mid_norm") or cfg.get("mid_act"):
        s += f" mid={cfg.get('mid_norm') or '-'}/{cfg.get('mid_act') or '-'}"
    return s


def _header(rep: Report) -> str:
    shape = rep.input_shape if rep.input_shape is not None else "?"
    what = "model report (no rewrite: before == after)" if rep.kind == "model" else "rewrite report"
    return (f"dsrewrite {what}: {rep.model}, recipe {rep.recipe!r}, capture {rep.capture}, "
            f"input {shape}; {sum(r.replaced for r in rep.layers)} replaced, "
            f"{sum(not r.replaced for r in rep.layers)} skipped")


#: rel L2 above which the report adds a hint on how to recover fidelity
LARGE_CHANGE = 0.3


def _fidelity_lines(rep: Report) -> list[str]:
    out = []
    labels = {"example": "on the example input", "calibration": "on the calibration inputs"}
    for key, fid in rep.fidelity.items():
        arg = "n/a" if fid.argmax_agreement is None else f"{100 * fid.argmax_agreement:.2f}%"
        out.append(f"fidelity {labels[key]} ({fid.batches} batch{'es' if fid.batches != 1 else ''}): "
                   f"rel L2 {fid.rel_l2:.3e}, cosine {fid.cosine:.6f}, argmax agreement {arg}, "
                   f"max |Δ| {fid.max_abs:.3e}")
    worst = max((f.rel_l2 for f in rep.fidelity.values() if f.rel_l2 == f.rel_l2), default=0.0)
    if worst > LARGE_CHANGE:
        out.append(
            f"hint: the outputs moved a lot (rel L2 {worst:.2f} > {LARGE_CHANGE}). SVD keeps the best rank-m kernel, "
            "but untrained or random kernels have flat spectra. Calibrate on a few unlabeled batches (--calib), "
            "raise --depth-multiplier, convert fewer layers (e.g. decoder_high_res), or fine-tune (dsrewrite heal)."
        )
    return out


def _latency_lines(rep: Report) -> list[str]:
    out = []
    labels = {"eager_nchw": "eager NCHW", "channels_last": "channels_last"}
    mac = rep.mac_ratio
    for key, lat in rep.latency.items():
        out.append(f"latency {labels[key]} ({lat.device}, median of {lat.rounds} interleaved rounds): "
                   f"{lat.median_a_ms:.3f} ms → {lat.median_b_ms:.3f} ms, time ratio after/before "
                   f"{lat.ratio:.3f} (median of per-round ratios) vs MAC ratio "
                   f"{'-' if mac is None else f'{mac:.3f}'}")
    return out


def render_table(rep: Report) -> str:
    """The readable terminal form of a report (the CLI's default output).

    Example:
        >>> import torch
        >>> from dsrewrite.plan_types import Plan
        >>> rep = build_plan_report(nn.Conv2d(3, 4, 3), Plan((), "all_3x3", "fx"), torch.zeros(1, 3, 5, 5))
        >>> "FLOPs = 2×MACs" in render_table(rep)
        True
    """
    lines = [_header(rep), "MACs: conv+linear multiply-accumulates for one forward on that input; FLOPs = 2×MACs", ""]
    rows = [("layer", "action", "params before→after", "MACs before→after", "MACs ×", "config / reason")]
    for r in rep.layers:
        detail = f"{_config_text(r.config)}  ({r.reason})" if r.replaced else r.reason
        rows.append((r.name, "replace" if r.replaced else "skip",
                     f"{_si(r.before.params)} → {_si(r.after.params)}",
                     f"{_si(r.before.macs)} → {_si(r.after.macs)}",
                     _factor(r.before.macs, r.after.macs), detail))
    o_b, o_a = rep.other_before, rep.other_after
    rows.append(("(everything else)", "", f"{_si(o_b.params)} → {_si(o_a.params)}",
                 f"{_si(o_b.macs)} → {_si(o_a.macs)}", _factor(o_b.macs, o_a.macs), "outside the plan's layers"))
    if rep.layers:
        lines += [_grid(rows), ""]
    rrows = [("region", "params before→after", "params Δ", "MACs before→after", "MACs Δ", "FLOPs after")]
    for g in [*rep.regions, RegionRow("total", rep.totals_before, rep.totals_after)]:
        rrows.append((g.name, f"{_si(g.before.params)} → {_si(g.after.params)}", _pct(g.before.params, g.after.params),
                      f"{_si(g.before.macs)} → {_si(g.after.macs)}", _pct(g.before.macs, g.after.macs),
                      _si(g.after.flops)))
    lines += [_grid(rrows), ""]
    tb, ta = rep.totals_before, rep.totals_after
    lines.append(f"total params: {tb.params:,} → {ta.params:,} ({_factor(tb.params, ta.params)} smaller, "
                 f"{_pct(tb.params, ta.params)})")
    lines.append(f"total MACs:   {tb.macs:,} → {ta.macs:,} ({_factor(tb.macs, ta.macs)} fewer, "
                 f"{_pct(tb.macs, ta.macs)}); FLOPs (= 2×MACs) {tb.flops:,} → {ta.flops:,}")
    lines.append(NOT_COUNTED)
    lines += _fidelity_lines(rep) + _latency_lines(rep)
    if rep.calibration is not None and hasattr(rep.calibration, "table"):
        lines += ["", "calibration:", rep.calibration.table()]
    lines += [f"plan note: {n}" for n in rep.plan_notes]
    lines += [f"note: {n}" for n in rep.notes]
    lines += [f"warning: {w}" for w in rep.warnings]
    return "\n".join(lines)


def _md_row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _md_table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return [_md_row(head), _md_row("---" for _ in head), *(_md_row(r) for r in rows)]


def render_markdown(rep: Report) -> str:
    """The report as Markdown: per-layer, per-region and total tables with exact counts.

    Example:
        >>> import torch
        >>> from dsrewrite.plan_types import Plan
        >>> rep = build_plan_report(nn.Conv2d(3, 4, 3), Plan((), "all_3x3", "fx"), torch.zeros(1, 3, 5, 5))
        >>> "| **total** | 112 | 112 |" in render_markdown(rep)
        True
    """
    out = [f"# {_header(rep)}", "",
           "MACs: multiply-accumulates of conv and linear layers (bias excluded) for one forward on the example "
           "input. **FLOPs = 2×MACs.** Params: parameter count (bias included).", "",
           f"_{NOT_COUNTED}._", ""]
    if rep.layers:
        out += ["## Layers of the plan", ""]
        rows = []
        for r in rep.layers:
            shapes = f"{r.input_shape or '?'} → {r.output_shape or '?'}"
            rows.append([f"`{r.name}`", r.region, shapes, "replace" if r.replaced else "skip",
                         f"{r.before.params:,}", f"{r.after.params:,}", f"{r.before.macs:,}", f"{r.after.macs:,}",
                         f"{r.after.flops:,}", _factor(r.before.macs, r.after.macs),
                         _config_text(r.config), r.reason])
        rows.append(["(everything else)", "", "", "", f"{rep.other_before.params:,}", f"{rep.other_after.params:,}",
                     f"{rep.other_before.macs:,}", f"{rep.other_after.macs:,}", f"{rep.other_after.flops:,}",
                     _factor(rep.other_before.macs, rep.other_after.macs), "", "outside the plan's layers"])
        out += _md_table(["layer", "region", "input → output", "action", "params before", "params after",
                          "MACs before", "MACs after", "FLOPs after (2×MACs)", "MACs ×", "config", "reason"], rows)
        out.append("")
    out += ["## Regions and total", ""]
    rows = []
    for g in [*rep.regions, RegionRow("total", rep.totals_before, rep.totals_after)]:
        total = g.before is rep.totals_before and g.after is rep.totals_after and g.name == "total"
        rows.append(["**total**" if total else g.name, f"{g.before.params:,}", f"{g.after.params:,}",
                     _pct(g.before.params, g.after.params), f"{g.before.macs:,}", f"{g.after.macs:,}",
                     _pct(g.before.macs, g.after.macs), _factor(g.before.macs, g.after.macs),
                     f"{g.before.flops:,}", f"{g.after.flops:,}"])
    out += _md_table(["region", "params before", "params after", "params Δ", "MACs before", "MACs after",
                      "MACs Δ", "MACs ×", "FLOPs before (2×MACs)", "FLOPs after (2×MACs)"], rows)
    extra = _fidelity_lines(rep) + _latency_lines(rep)
    if extra:
        out += ["", "## Fidelity and latency", "", *(f"- {x}" for x in extra)]
    if rep.calibration is not None and hasattr(rep.calibration, "table"):
        out += ["", "## Calibration", "", "```", rep.calibration.table(), "```"]
    tail = ([f"- plan note: {n}" for n in rep.plan_notes] + [f"- note: {n}" for n in rep.notes]
            + [f"- **warning:** {w}" for w in rep.warnings])
    if tail:
        out += ["", "## Notes", "", *tail]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
_SUFFIXES = {".json": "JSON", ".md": "Markdown", ".txt": "plain-text table"}


def _write_atomic(path: Path, data: Union[str, bytes]) -> None:
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist. "
                          "Hint: create it first or choose another path.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_report(rep: Report, path: Union[str, os.PathLike]) -> Path:
    """Write the report as JSON (``.json``), Markdown (``.md``) or the terminal table (``.txt``).

    Raises:
        OutputError: another suffix, or the folder does not exist.

    Example:
        >>> import torch, tempfile, json
        >>> from dsrewrite.plan_types import Plan
        >>> rep = build_plan_report(nn.Conv2d(3, 4, 3), Plan((), "all_3x3", "fx"), torch.zeros(1, 3, 5, 5))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     json.loads(save_report(rep, f"{d}/r.json").read_text())["schema_version"]
        1
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in _SUFFIXES:
        raise OutputError(
            f"report path {str(p)!r} has suffix {suffix or '(none)'!r}; use one of "
            f"{', '.join(f'{s} ({k})' for s, k in _SUFFIXES.items())}{did_you_mean(suffix, _SUFFIXES)}."
        )
    if suffix == ".json":
        text = json.dumps(rep.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    elif suffix == ".md":
        text = render_markdown(rep)
    else:
        text = render_table(rep) + "\n"
    _write_atomic(p, text)
    return p


def save_plot(rep: Report, path: Union[str, os.PathLike], *, max_layers: int = 60) -> Path:
    """Write a PNG bar chart of per-layer MACs before and after (matplotlib, Agg canvas, no pyplot).

    At most ``max_layers`` layers are drawn (those with the most MACs before).

    Raises:
        PlotUnavailableError: matplotlib is not installed.
        OutputError: the suffix is not ``.png`` or the folder does not exist.

    Example:
        >>> import torch, tempfile
        >>> from dsrewrite.plan_types import Plan, PlanEntry
        >>> p = Plan((PlanEntry("", "skip", "demo"),), "all_3x3", "fx")
        >>> rep = build_plan_report(nn.Conv2d(3, 4, 3), p, torch.zeros(1, 3, 5, 5))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_plot(rep, f"{d}/macs.png").read_bytes()[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise OutputError(f"plot path {str(p)!r} must end in .png (got {p.suffix or 'no suffix'!r}).")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError as exc:
        raise PlotUnavailableError(
            f"save_plot needs matplotlib, which cannot be imported ({exc}). "
            "Hint: pip install 'dsrewrite[plot]' (or pip install matplotlib)."
        ) from exc
    import io

    layers = list(rep.layers)
    title = f"{rep.model}: MACs per plan layer (recipe {rep.recipe!r}; FLOPs = 2×MACs)"
    if len(layers) > max_layers:
        keep = set(sorted(range(len(layers)), key=lambda i: -layers[i].before.macs)[:max_layers])
        layers = [r for i, r in enumerate(layers) if i in keep]
        title += f"\n{max_layers} of {len(rep.layers)} layers shown (largest before)"
    n = max(1, len(layers))
    fig = Figure(figsize=(10, 1.6 + 0.28 * n))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = list(range(len(layers)))
    ax.barh([y - 0.2 for y in ys], [r.before.macs for r in layers], height=0.4, label="before", color="#8c8c8c")
    ax.barh([y + 0.2 for y in ys], [r.after.macs for r in layers], height=0.4, label="after", color="#1f77b4")
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r.name} ({'replace' if r.replaced else 'skip'})" for r in layers], fontsize=7)
    ax.invert_yaxis()
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel("MACs (conv+linear multiply-accumulates, one forward)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    if not layers:
        ax.text(0.5, 0.5, "no layers in the plan", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _write_atomic(p, buf.getvalue())
    return p
