# SPDX-License-Identifier: Apache-2.0
"""What calibration reports: per-layer records, the result of a run, and its usage error.

Example:
    >>> r = LayerCalibration("up.conv", "dw_pw", 1, "last_stage", 0.2, 0.1, 4096)
    >>> res = CalibrationResult((r,), None, None, images=8, batches=2, seconds=0.5, replay_cache=True)
    >>> res.to_dict()["layers"][0]["rel_error_after"], res.images
    (0.1, 8)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..errors import UsageError

__all__ = ["CalibrationResult", "LayerCalibration", "CalibrationUsageError"]


class CalibrationUsageError(UsageError):
    """Bad calibration input: no batches, unknown or mismatched layer names, bad options."""


@dataclass(frozen=True)
class LayerCalibration:
    """What calibration did to one layer.

    Errors are relative L2 (``‖block(x) − conv_orig(x_orig)‖ / ‖conv_orig(x_orig)‖``) over
    the sampled calibration positions, ``x`` coming from the rewritten model with the
    earlier layers already calibrated. ``steps`` lists the accepted refits in order
    (``"last"``: the last stage and bias; ``"first"``: the first stage; ``"relu"``: the refit
    through the following activation, see :meth:`LayerFit.refit_through_relu`); ``method`` is
    ``"last_stage"``, ``"alternating"`` or ``"skipped"``.

    ``activation`` names the (BatchNorm +) ReLU that follows the conv when calibration
    fitted through it (``""`` otherwise); ``act_error_before``/``act_error_after`` are then
    the relative L2 error of that activation's output (what the next layer sees) on the
    stored positions. For such layers it is the ACTIVATION error that calibration never
    increases; the conv-output error ``rel_error_after`` may rise, since errors on
    pre-activations the ReLU zeroes do not count.
    """

    name: str
    order: str
    depth_multiplier: int
    method: str
    rel_error_before: float
    rel_error_after: float
    positions: int
    steps: tuple[str, ...] = ()
    note: str = ""
    activation: str = ""
    act_error_before: Optional[float] = None
    act_error_after: Optional[float] = None


@dataclass(frozen=True)
class CalibrationResult:
    """Per-layer results plus the whole model's output error before and after (relative L2).

    ``output_rel_error_*`` compare all output tensors of the rewritten model with the
    original's over every calibration batch (``None`` with ``measure_output=False``).
    """

    layers: tuple[LayerCalibration, ...]
    output_rel_error_before: Optional[float]
    output_rel_error_after: Optional[float]
    images: int
    batches: int
    seconds: float
    replay_cache: bool
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def table(self) -> str:
        """A plain-text table, one row per layer.

        Example:
            >>> r = CalibrationResult((LayerCalibration("a", "dw_pw", 1, "last_stage", 0.5, 0.25, 10, ("last",)),),
            ...                       0.4, 0.2, 2, 1, 0.1, True)
            >>> print(r.table())  # doctest: +NORMALIZE_WHITESPACE
            layer  order  m  method      rel err before  rel err after  steps  note
            a      dw_pw  1  last_stage  0.5000          0.2500         last
            model output rel err: 0.4000 -> 0.2000 (2 images, 1 batches, 0.1 s)
        """
        acts = any(l.activation for l in self.layers)
        head = ("layer", "order", "m", "method", "rel err before", "rel err after") + (
            ("act err before", "act err after") if acts else ()) + ("steps", "note")

        def act_cols(l: LayerCalibration) -> tuple[str, ...]:
            if not acts:
                return ()
            if l.act_error_before is None or l.act_error_after is None:
                return ("", "")
            return (f"{l.act_error_before:.4f}", f"{l.act_error_after:.4f}")

        rows = [head] + [
            (l.name, l.order, str(l.depth_multiplier), l.method, f"{l.rel_error_before:.4f}",
             f"{l.rel_error_after:.4f}") + act_cols(l) + (",".join(l.steps), l.note)
            for l in self.layers
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]

        def fmt(v: Optional[float]) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        lines.append(
            f"model output rel err: {fmt(self.output_rel_error_before)} -> {fmt(self.output_rel_error_after)} "
            f"({self.images} images, {self.batches} batches, {self.seconds:.1f} s)"
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
