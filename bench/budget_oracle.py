"""Diagnostic for the budget bench (issue 18): is a budget miss the sensitivity's fault or the allocation's?

For the classifier of :mod:`bench.budget`, every candidate of every selected conv is applied ALONE (the other
convs dense), calibrated as the bench calibrates, and its squared relative output error measured on a
validation set (1024 generated images, seed 14, disjoint from the calibration (13) and held-out (12) sets).
These measured single-conv errors replace the predicted ones in the same allocation (additive model,
:func:`dsrewrite.budget.allocate.allocate`); the resulting "oracle" plan is then calibrated and measured on the
held-out images like the bench's rows, and printed as one JSON line that ``bench.budget --merge`` reads
(``part`` = ``oracle:F``). Also printed: measured vs predicted single-conv errors.

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m bench.budget_oracle --held-out 4096 --budget m2 --budget 0.5

If the oracle plan beats the target where the predicted plan misses, the prediction is what to improve; if
it does not, errors do not add up (or the per-conv choice cannot reach the target on this model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import replace
from typing import Any

import torch

from bench.budget import classifier_data, outputs, train_classifier
from dsrewrite.api import plan_rewrite, rewrite_with_plan
from dsrewrite.budget.allocate import Option, allocate
from dsrewrite.budget.planner import budget_problem
from dsrewrite.budget.sensitivity import data_sensitivity
from dsrewrite.measure.macs import count_costs
from dsrewrite.planning.types import LayerConfig, PlanEntry


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--held-out", type=int, default=4096)
    ap.add_argument("--budget", action="append", default=None, help="m2 (the MACs of uniform dw_pw m=2) or a fraction")
    args = ap.parse_args()
    torch.manual_seed(0)
    dense, _ = train_classifier()
    xt, yt = classifier_data(args.held_out, seed=12)
    xv, _ = classifier_data(1024, seed=14)
    xc, _ = classifier_data(64, seed=13)
    calib = [xc[i:i + 16] for i in range(0, 64, 16)]
    ex = xt[:1]
    ref_v, ref_t = outputs(dense, xv).double(), outputs(dense, xt).double()

    def err2(model: torch.nn.Module, x: torch.Tensor, ref: torch.Tensor) -> float:
        return float(((outputs(model, x).double() - ref).norm() / ref.norm()) ** 2)

    prob = budget_problem(dense, "all_3x3", ex, order="auto")
    sens = data_sensitivity(dense, prob.layers, calib)
    measured: list[list[float]] = []
    for lc, ls in zip(prob.layers, sens.layers):
        row = []
        for i, c in enumerate(lc.candidates):
            if c.dense:
                row.append(0.0)
                continue
            alone = {other.name: other.candidates[0] for other in prob.layers}  # candidates[0] is dense
            alone[lc.name] = c
            res = rewrite_with_plan(dense, plan_of(prob, alone), ex, calibration=calib, with_report=False)
            row.append(err2(res.model, xv, ref_v))
            print(f"single conv {lc.name} {c.label}: measured {row[-1]:.4g}, predicted {ls.errors[i]:.4g} "
                  f"(ratio {ls.errors[i] / row[-1] if row[-1] else math.nan:.2f})", flush=True)
        measured.append(row)
    total = prob.total_macs
    for b in args.budget or ["m2", "0.5"]:
        if b == "m2":
            p2 = plan_rewrite(dense, "all_3x3", ex, depth_multiplier=2, order="dw_pw")
            target = count_costs(rewrite_with_plan(dense, p2, ex, with_report=False).model, ex).total_macs
            label = "uniform dw_pw m=2 MACs"
        else:
            target, label = int(float(b) * total), f"{float(b):g} of the MACs"
        groups = [[Option(c, e) for c, e in zip(lc.cost("macs"), row)] for lc, row in zip(prob.layers, measured)]
        alloc = allocate(groups, max_cost=target - prob.fixed_macs)
        choice = {lc.name: lc.candidates[i] for lc, i in zip(prob.layers, alloc.choice)}
        res = rewrite_with_plan(dense, plan_of(prob, choice), ex, calibration=calib, with_report=False)
        out = outputs(res.model, xt)
        r = {"macs": count_costs(res.model, ex).total_macs,
             "rel_err": float((out.double() - ref_t).norm() / ref_t.norm()),
             "metric": float((out.argmax(1) == yt).float().mean()), "calib_rel_err": res.calibration.output_rel_error_after,
             "part": f"oracle:{b}", "target": f"oracle (measured single-conv errors): {label}", "target_macs": target,
             "predicted_err": math.sqrt(alloc.error), "choices": {k: c.label for k, c in choice.items()},
             "model": "classifier", "dense_macs": total,
             "dense_metric": float((ref_t.argmax(1) == yt).float().mean()), "load": os.getloadavg(),
             "time": time.strftime("%H:%M:%S")}
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
