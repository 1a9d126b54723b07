"""Diagnostic for the budget bench (issue 18): is a budget miss the sensitivity's fault or the allocation's?

For a model of :mod:`bench.budget` (``--model classifier``, the default, or ``--model unet``), every candidate
of every selected conv is applied ALONE (the other convs dense), calibrated as the bench calibrates (64
images, batches of 16), and its squared relative output error measured on a validation set disjoint from the
calibration and held-out sets:

* classifier: validation 1024 generated images of seed 14 (calibration seed 13, held-out seed 12);
* U-Net (:func:`dsrewrite.shapes.trained_unet`): validation 256 images of 64² from
  ``make_shapes(seed=4)`` (the shapes splits use seeds 1 train, 2 held-out, 3 calibration).

These measured single-conv errors replace the predicted ones in the same allocation (additive model,
:func:`dsrewrite.budget.allocate.allocate`); the resulting "oracle" plan is then calibrated and measured on the
held-out images like the bench's rows, and printed as one JSON line that ``bench.budget --merge`` reads
(``part`` = ``oracle:F``). Also printed: measured vs predicted single-conv errors (``--skip-predicted``: only
measured, saving one planning's sensitivity pass). The candidates can be measured in parts, as separate
processes (``--conv NAME``, repeated), and the allocation run on their logs (``--reuse LOG``, repeated).

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m bench.budget_oracle --held-out 4096 --budget m2 --budget 0.5
    OMP_NUM_THREADS=1 PYTHONPATH=. python -m bench.budget_oracle --model unet --held-out 256 --budget m2 --budget 0.5

If the oracle plan beats the target where the predicted plan misses, the prediction is what to improve; if
it does not, errors do not add up (or the per-conv choice cannot reach the target on this model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor, nn

from bench.budget import classifier_data, outputs, train_classifier
from dsrewrite.api import plan_rewrite, rewrite_with_plan
from dsrewrite.budget.allocate import Option, allocate
from dsrewrite.budget.planner import budget_problem
from dsrewrite.budget.sensitivity import data_sensitivity
from dsrewrite.measure.macs import count_costs
from dsrewrite.planning.types import LayerConfig, PlanEntry
from dsrewrite.shapes import TRAIN_CONFIG, calibration_images, held_out, make_shapes, trained_unet
from dsrewrite.shapes.data import confusion, miou

#: The U-Net's validation set for single-conv errors: a shapes seed used by none of its splits (1, 2, 3).
UNET_VALIDATION = {"images": 256, "seed": TRAIN_CONFIG["seed"] * 1000 + 4}


@dataclass(frozen=True)
class Bench:
    """One model with its data: calibration batches, held-out images and labels, validation images, metric."""

    name: str
    dense: nn.Module
    calib: list[Tensor]
    xt: Tensor
    xv: Tensor
    metric: Callable[[Tensor], float]


def classifier_bench(n_held_out: int) -> Bench:
    """The classifier of :mod:`bench.budget` (trained or cached) with its seeds 13 / 12 / 14; metric accuracy."""
    dense, _ = train_classifier()
    xt, yt = classifier_data(n_held_out, seed=12)
    xv, _ = classifier_data(1024, seed=14)
    xc, _ = classifier_data(64, seed=13)
    return Bench("classifier", dense, [xc[i:i + 16] for i in range(0, 64, 16)], xt, xv,
                 lambda out: float((out.argmax(1) == yt).float().mean()))


def unet_bench(n_held_out: int) -> Bench:
    """The trained shapes U-Net as :mod:`bench.budget` runs it; validation from :data:`UNET_VALIDATION`."""
    xt, yt = held_out(n_held_out)
    xv, _ = make_shapes(UNET_VALIDATION["images"], size=TRAIN_CONFIG["size"], seed=UNET_VALIDATION["seed"])
    c = calibration_images(64)
    return Bench("shapes U-Net", trained_unet(), [c[i:i + 16] for i in range(0, 64, 16)], xt, xv,
                 lambda out: miou(confusion(out.argmax(1), yt)))


def plan_of(prob: Any, choice: dict[str, Any]) -> Any:
    """The recipe's base plan with each selected conv set to ``choice[name]`` (a Candidate; dense = skip)."""
    entries = []
    for e in prob.base.entries:
        c = choice.get(e.name)
        if c is None:
            entries.append(e)
        elif c.dense:
            entries.append(PlanEntry(e.name, "skip", "oracle: dense", fact=e.fact, measured=e.measured))
        else:
            cfg = replace(e.config or LayerConfig(), order=c.kind, depth_multiplier=c.m, note="oracle")
            entries.append(PlanEntry(e.name, "replace", "oracle", config=cfg, fact=e.fact, measured=e.measured))
    return replace(prob.base, entries=tuple(entries))


def err2(model: nn.Module, x: Tensor, ref: Tensor) -> float:
    """Squared relative L2 output error of ``model`` on ``x`` against the dense outputs ``ref`` (float64)."""
    return float(((outputs(model, x).double() - ref).norm() / ref.norm()) ** 2)


def read_measured(logs: list[str]) -> dict[tuple[str, str], float]:
    """The single-conv errors printed by earlier runs (``single conv NAME LABEL: measured V``), keyed (NAME, LABEL)."""
    pat = re.compile(r"single conv (\S+) (.+?): measured ([0-9.eE+-]+)")
    found = {}
    for log in logs:
        for m in pat.finditer(Path(log).read_text(encoding="utf-8")):
            found[(m.group(1), m.group(2))] = float(m.group(3))
    return found


def single_conv_errors(b: Bench, prob: Any, ex: Tensor, predicted: Any | None,
                       reused: dict[tuple[str, str], float] | None = None,
                       convs: set[str] | None = None) -> list[list[float]]:
    """Each candidate of each selected conv alone (others dense), calibrated: its squared validation error.

    ``reused`` errors (from :func:`read_measured`) are taken as they are; with ``convs``, only those convs are
    measured (the others' rows are left empty: a partial run that a later ``--reuse`` completes)."""
    ref_v = outputs(b.dense, b.xv).double()
    measured: list[list[float]] = []
    for j, lc in enumerate(prob.layers):
        row: list[float] = []
        if convs is not None and lc.name not in convs:
            measured.append(row)
            continue
        for i, c in enumerate(lc.candidates):
            if c.dense:
                row.append(0.0)
                continue
            if reused and (lc.name, c.label) in reused:
                row.append(reused[(lc.name, c.label)])
                continue
            alone = {other.name: other.candidates[0] for other in prob.layers}  # candidates[0] is dense
            alone[lc.name] = c
            res = rewrite_with_plan(b.dense, plan_of(prob, alone), ex, calibration=b.calib, with_report=False)
            row.append(err2(res.model, b.xv, ref_v))
            line = f"single conv {lc.name} {c.label}: measured {row[-1]:.4g}"
            if predicted is not None:
                p = predicted.layers[j].errors[i]
                line += f", predicted {p:.4g} (ratio {p / row[-1] if row[-1] else math.nan:.2f})"
            print(f"({time.strftime('%H:%M:%S')}) {line}", flush=True)
        measured.append(row)
    return measured


def budget_target(dense: nn.Module, ex: Tensor, total: int, b: str) -> tuple[int, str]:
    """``m2`` (the counted MACs of uniform dw_pw m=2) or a fraction of ``total``: (MACs, label)."""
    if b == "m2":
        p2 = plan_rewrite(dense, "all_3x3", ex, depth_multiplier=2, order="dw_pw")
        return count_costs(rewrite_with_plan(dense, p2, ex, with_report=False).model, ex).total_macs, \
            "uniform dw_pw m=2 MACs"
    return int(float(b) * total), f"{float(b):g} of the MACs"


def oracle_row(b: Bench, prob: Any, ex: Tensor, measured: list[list[float]], budget: str) -> dict[str, Any]:
    """Allocate on the measured single-conv errors within ``budget``, calibrate, measure on the held-out set."""
    total = prob.total_macs
    target, label = budget_target(b.dense, ex, total, budget)
    groups = [[Option(c, e) for c, e in zip(lc.cost("macs"), row)] for lc, row in zip(prob.layers, measured)]
    alloc = allocate(groups, max_cost=target - prob.fixed_macs)
    choice = {lc.name: lc.candidates[i] for lc, i in zip(prob.layers, alloc.choice)}
    res = rewrite_with_plan(b.dense, plan_of(prob, choice), ex, calibration=b.calib, with_report=False)
    out, ref_t = outputs(res.model, b.xt), outputs(b.dense, b.xt)
    return {"macs": count_costs(res.model, ex).total_macs,
            "rel_err": float((out.double() - ref_t.double()).norm() / ref_t.double().norm()),
            "metric": b.metric(out), "calib_rel_err": res.calibration.output_rel_error_after,
            "part": f"oracle:{budget}", "target": f"oracle (measured single-conv errors): {label}",
            "target_macs": target, "predicted_err": math.sqrt(alloc.error),
            "choices": {k: c.label for k, c in choice.items()}, "model": b.name, "dense_macs": total,
            "dense_metric": b.metric(ref_t), "load": os.getloadavg(), "time": time.strftime("%H:%M:%S")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["classifier", "unet"], default="classifier")
    ap.add_argument("--held-out", type=int, default=4096)
    ap.add_argument("--budget", action="append", default=None, help="m2 (the MACs of uniform dw_pw m=2) or a fraction")
    ap.add_argument("--skip-predicted", action="store_true", help="do not compute the predicted errors to compare")
    ap.add_argument("--reuse", action="append", default=[], metavar="LOG",
                    help="take the single-conv errors printed in these logs of earlier runs instead of measuring them")
    ap.add_argument("--conv", action="append", default=None, metavar="NAME",
                    help="only measure these convs' candidates and stop (a part; merge the logs with --reuse)")
    args = ap.parse_args()
    torch.manual_seed(0)
    b = (unet_bench if args.model == "unet" else classifier_bench)(args.held_out)
    ex = b.xt[:1]
    prob = budget_problem(b.dense, "all_3x3", ex, order="auto")
    print(f"{b.name}: {len(prob.layers)} convs, {sum(len(lc.candidates) for lc in prob.layers)} candidates "
          f"(with dense); load {os.getloadavg()}", flush=True)
    predicted = None if args.skip_predicted else data_sensitivity(b.dense, prob.layers, b.calib)
    reused = read_measured(args.reuse)
    measured = single_conv_errors(b, prob, ex, predicted, reused, set(args.conv) if args.conv else None)
    if args.conv:
        return
    for budget in args.budget or ["m2", "0.5"]:
        print(json.dumps(oracle_row(b, prob, ex, measured, budget)), flush=True)


if __name__ == "__main__":
    main()
