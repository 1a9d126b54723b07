# SPDX-License-Identifier: Apache-2.0
"""Text pieces the renderers share: compact counts, ratios, grids, the header and the fidelity/latency lines.

Example:
    >>> si(231211008), factor(100, 25), pct(100, 25)
    ('231.2M', '4.00×', '−75.0%')
"""

from __future__ import annotations

from typing import Any, Optional, Union

from .records import Report, reduction

__all__ = ["si", "factor", "pct", "grid", "config_text", "header", "LARGE_CHANGE", "fidelity_lines", "latency_lines",
           "fidelity_change_line"]


def si(n: Optional[Union[int, float]]) -> str:
    """Compact count: ``231211008 -> '231.2M'``."""
    if n is None:
        return "-"
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.4g}{suf}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def factor(before: int, after: int) -> str:
    r = reduction(before, after)
    if r["factor"] is None:
        return "-" if not before else "∞"
    return f"{r['factor']:.2f}×"


def pct(before: int, after: int) -> str:
    """Change from before to after: ``'−88.1%'`` (fewer), ``'+3.0%'`` (more), ``'0.0%'``."""
    p = reduction(before, after)["percent"]
    if p is None:
        return "-"
    if p == 0:
        return "0.0%"
    return f"−{p:.1f}%" if p > 0 else f"+{-p:.1f}%"


def grid(rows: list[tuple[str, ...]], right: frozenset[int] = frozenset()) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("-" * min(140, len(out[0])))
    return "\n".join(out)


def config_text(cfg: Optional[dict[str, Any]]) -> str:
    if not cfg:
        return ""
    s = f"{cfg.get('order')} m={cfg.get('depth_multiplier')} init={cfg.get('init')}"
    if cfg.get("mid_norm") or cfg.get("mid_act"):
        s += f" mid={cfg.get('mid_norm') or '-'}/{cfg.get('mid_act') or '-'}"
    return s


def header(rep: Report) -> str:
    shape = rep.input_shape if rep.input_shape is not None else "?"
    what = "model report (no rewrite: before == after)" if rep.kind == "model" else "rewrite report"
    return (f"dsrewrite {what}: {rep.model}, recipe {rep.recipe!r}, capture {rep.capture}, "
            f"input {shape}; {sum(r.replaced for r in rep.layers)} replaced, "
            f"{sum(not r.replaced for r in rep.layers)} skipped")


#: rel L2 above which the report adds a hint on how to recover fidelity
LARGE_CHANGE = 0.3


def fidelity_lines(rep: Report) -> list[str]:
    out = []
    labels = {"example": "on the example input", "calibration": "on the calibration inputs"}
    for key, fid in rep.fidelity.items():
        arg = "n/a" if fid.argmax_agreement is None else f"{100 * fid.argmax_agreement:.2f}%"
        what = (f" of the modules around the replaced convs ({', '.join(fid.regions)}), as the model outputs could "
                "not be compared" if fid.compared == "regions" else "")
        head = f"fidelity {labels[key]} ({fid.batches} batch{'es' if fid.batches != 1 else ''}){what}: "
        if fid.rel_l2 is None:
            out.append(head + "nothing could be compared")
        else:
            out.append(head + f"rel L2 {fid.rel_l2:.3e}, cosine {fid.cosine:.6f}, argmax agreement {arg}, "
                       f"max |Δ| {fid.max_abs:.3e}")
        if fid.not_compared:
            shown = "; ".join(f"{n.path or '<output>'}: {n.why}" for n in fid.not_compared[:4])
            more = f" and {len(fid.not_compared) - 4} more" if len(fid.not_compared) > 4 else ""
            out.append(f"  not compared ({len(fid.not_compared)} output leaves): {shown}{more}")
    task = getattr(rep, "task", None)
    if task is not None:
        steps = [("original", task.original), ("after SVD", task.svd), ("after calibration", task.calibrated)]
        out.append(f"task metric {task.name}: " + " → ".join(f"{k} {v:.2f}" for k, v in steps if v is not None))
    worst = max((f.rel_l2 for f in rep.fidelity.values() if f.rel_l2 is not None and f.rel_l2 == f.rel_l2),
                default=0.0)
    if worst > LARGE_CHANGE:
        out.append(
            f"hint: the outputs moved a lot (rel L2 {worst:.2f} > {LARGE_CHANGE}). SVD keeps the best rank-m kernel, "
            "but untrained or random kernels have flat spectra. Calibrate on a few unlabeled batches (--calib), "
            "raise --depth-multiplier, convert fewer layers (e.g. decoder_high_res), or fine-tune (dsrewrite heal)."
        )
    return out


def fidelity_change_line(label: str, before: Any, after: Any) -> str:
    """One line: a :class:`~dsrewrite.fidelity.Fidelity` before → after (healing), in the report's terms.

    Example:
        >>> from types import SimpleNamespace as F
        >>> fidelity_change_line("on the example input", F(rel_l2=0.2, cosine=0.98, argmax_agreement=0.9, max_abs=1.0,
        ...     batches=1), F(rel_l2=0.1, cosine=0.995, argmax_agreement=None, max_abs=0.5, batches=1))
        'fidelity on the example input (1 batch): rel L2 2.000e-01 → 1.000e-01, cosine 0.980000 → 0.995000, argmax agreement 90.00% → n/a, max |Δ| 1.000e+00 → 5.000e-01'
    """
    def arg(f: Any) -> str:
        return "n/a" if f.argmax_agreement is None else f"{100 * f.argmax_agreement:.2f}%"

    n = before.batches
    return (f"fidelity {label} ({n} batch{'es' if n != 1 else ''}): rel L2 {before.rel_l2:.3e} → {after.rel_l2:.3e}, "
            f"cosine {before.cosine:.6f} → {after.cosine:.6f}, argmax agreement {arg(before)} → {arg(after)}, "
            f"max |Δ| {before.max_abs:.3e} → {after.max_abs:.3e}")


def latency_lines(rep: Report) -> list[str]:
    out = []
    labels = {"eager_nchw": "eager NCHW", "channels_last": "channels_last"}
    mac = rep.mac_ratio
    for key, lat in rep.latency.items():
        out.append(f"latency {labels[key]} ({lat.device}, median of {lat.rounds} interleaved rounds): "
                   f"{lat.median_a_ms:.3f} ms → {lat.median_b_ms:.3f} ms, time ratio after/before "
                   f"{lat.ratio:.3f} (median of per-round ratios) vs MAC ratio "
                   f"{'-' if mac is None else f'{mac:.3f}'}")
    return out
