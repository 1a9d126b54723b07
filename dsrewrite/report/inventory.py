# SPDX-License-Identifier: Apache-2.0
"""The inventory of ``dsrewrite inspect``: every conv's captured facts with params and MACs, and its table.

The graph-predicate columns are the registered predicates' (:mod:`dsrewrite.predicates`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..macs import NOT_COUNTED, measure
from ..predicates import predicates
from .records import REPORT_SCHEMA_VERSION, UNITS, finite
from .text import grid, si

__all__ = ["build_inventory", "render_inventory"]


def build_inventory(model: nn.Module, capture: Any, example_inputs: Any) -> dict[str, Any]:
    """Every conv's captured facts with its params and MACs, as a JSON-ready dict.

    ``capture`` is a :class:`~dsrewrite.facts.Capture` of ``model``.

    Example:
        >>> import torch
        >>> from torch import nn
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
    return finite({
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
        >>> from torch import nn
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
            si(c["params"]), si(c["macs"]),
        ))
    shape = tuple(inv["input_shape"]) if inv.get("input_shape") else "?"
    t = inv["totals"]
    lines = [
        f"{inv['model']}: {len(inv['convs'])} convs, capture {inv['capture']}, input {shape}",
        grid(rows),
        f"total: params {t['params']:,}; MACs {t['macs']:,}; FLOPs (= 2×MACs) {t['flops']:,}",
        f"os: output stride; {'/'.join(p.column for p in preds)}: {' / '.join(p.legend for p in preds)} (?: unknown)",
        NOT_COUNTED,
    ]
    lines += [f"functional conv (not replaceable): {f}" for f in inv.get("functional_convs", [])]
    lines += [f"note: {n}" for n in inv.get("notes", [])]
    lines += [f"warning: {w}" for w in inv.get("warnings", [])]
    return "\n".join(lines)
