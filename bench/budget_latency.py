"""Latency budgets on the shipped trained shapes U-Net: target, predicted, measured (docs/budget.md).

For each target (a fraction of the dense model's latency): plan with ``budget={"latency_ms": f}``
(``order="auto"``, data sensitivity on 64 calibration images), rewrite, calibrate, and time the result
against the dense model (interleaved). Prints one JSON line per target with the load average before and
after, the plan's prediction, the measured latency, how far the prediction was off, the held-out output
error and mIoU, and the seconds the timings and the whole call took.

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m bench.budget_latency --targets 0.7,0.85 --batch 8 [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import torch

import dsrewrite.budget.planner as planner
from dsrewrite.api import rewrite_and_report
from dsrewrite.budget.types import BudgetError
from dsrewrite.measure.macs import count_costs
from dsrewrite.shapes import calibration_images, held_out, trained_unet
from dsrewrite.shapes.data import confusion, miou

_NOTE = re.compile(r"latency check: target (\S+) ms \((\S+) of dense\), predicted (\S+) ms \((\S+) of dense\), "
                   r"measured (\S+) ms .*: (\S+) of dense, .*off by (\S+)%")


_TIMED: list[float] = []
_measure = planner.measure_latency_costs


def _recording(*a, **k):  # the seconds the timings took (LatencyCosts.seconds), for the table
    costs = _measure(*a, **k)
    _TIMED.append(costs.seconds)
    return costs


def main() -> None:
    planner.measure_latency_costs = _recording
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--targets", default="0.7,0.85")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="the example input's batch (its latency is the target's)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    dense = trained_unet().to(dev).eval()
    c = calibration_images(64).to(dev)
    calib = [c[i:i + 16] for i in range(0, 64, 16)]
    xt, yt = held_out(args.held_out)
    xt, yt = xt.to(dev), yt.to(dev)
    x = xt[:args.batch]
    with torch.inference_mode():
        ref = dense(xt)
    for f in (float(v) for v in args.targets.split(",")):
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        try:
            res = rewrite_and_report(dense, "all_3x3", example_inputs=x, calibration=calib,
                                     budget={"latency_ms": f}, order="auto")
        except BudgetError as exc:  # the target is below what the fastest candidates reach (measured now)
            print(json.dumps({"target_fraction": f, "batch": args.batch, "load_before": load0, "refused": str(exc)}),
                  flush=True)
            continue
        wall = time.perf_counter() - t0
        check = next(n for n in res.plan.notes if n.startswith("latency check:"))
        m = _NOTE.match(check)
        with torch.inference_mode():
            out = res.model(xt)
        err = float((out - ref).norm() / ref.norm())
        chosen = [f"{e.name}: {e.reason.split('; ')[0]}" for e in res.plan.entries
                  if e.measured and "budget_ms" in e.measured]
        print(json.dumps({
            "target_fraction": f, "batch": args.batch, "device": str(dev), "torch_threads": torch.get_num_threads(),
            "load_before": load0, "load_after": os.getloadavg(),
            "target_ms": float(m.group(1)), "target_ratio": float(m.group(2)), "predicted_ms": float(m.group(3)),
            "predicted_ratio": float(m.group(4)), "measured_ms": float(m.group(5)), "measured_ratio": float(m.group(6)),
            "prediction_off_pct": float(m.group(7)),
            "macs_ratio": count_costs(res.model, x).total_macs / count_costs(dense, x).total_macs,
            "held_out_rel_err": err, "miou": miou(confusion(out.argmax(1).cpu(), yt.cpu())),
            "dense_miou": miou(confusion(ref.argmax(1).cpu(), yt.cpu())),
            "choices": chosen, "check": check, "wall_s": wall, "timing_s": _TIMED[-1],
            "notes": [n for n in res.plan.notes if n.startswith(("latency", "budget ("))],
        }), flush=True)


if __name__ == "__main__":
    main()
