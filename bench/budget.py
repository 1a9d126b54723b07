"""Budget benchmark (issue 18): does planning for a MAC budget beat the best uniform configuration?

One command, from the repository root:

    PYTHONPATH=. .venv/bin/python -m bench.budget                 # both models, the timing, the plot
    PYTHONPATH=. .venv/bin/python -m bench.budget --skip-timing   # without the demo U-Net timing

For two trained models,

* the shipped demo U-Net trained on shapes (:mod:`dsrewrite.shapes`; metric: held-out mIoU), and
* a small CNN classifier trained HERE on generated shapes images (the class covering most pixels;
  seeded, about 100 s of CPU on one thread; cached in ``bench/.cache/``; metric: held-out accuracy),

it rewrites ``all_3x3`` uniformly (``dw_pw``/``pw_dw`` × m = 1, 2, 3), calibrates on 64 unlabeled
images and measures, on held-out images, the output relative L2 error against the dense model and
the task metric (no healing). Then it plans with ``budget={"macs": B}`` (``order="auto"``, data
sensitivity from the same 64 images) at two budgets, B = the MACs of uniform ``dw_pw`` m=2 and
B = half the dense model's MACs, calibrates and measures the same way, and compares with the best
uniform configuration within B (the lowest held-out error among those with MACs ≤ B); without
``--skip-sweep`` also at 0.25, 0.4 and 0.65 of the MACs. It plots MACs against held-out error for each
model (docs/budget_<model>.png). On a shared machine, run the configurations as separate processes
(``--part``) and merge their JSON lines (``--merge``); docs/budget.md has the commands.

Timing: on the full demo U-Net (ResNet18 encoder, random weights) with 64 images of 256², it times
one calibration (all_3x3, m=1, dw_pw) and one planning with data sensitivity (budget 0.5),
interleaved in one run.

Results: ``bench/.cache/budget_results.json`` and stdout (Markdown).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import Tensor, nn

from dsrewrite.api import plan_rewrite, rewrite_with_plan
from dsrewrite.budget.planner import plan_with_budget
from dsrewrite.budget.types import parse_budget
from dsrewrite.measure.macs import count_costs
from dsrewrite.shapes import calibration_images, held_out, make_shapes, trained_unet
from dsrewrite.shapes.data import confusion, miou

CACHE = Path(__file__).resolve().parent / ".cache"
DOCS = Path(__file__).resolve().parent.parent / "docs"


# --------------------------------------------------------------------------------------
# the classifier, trained here
# --------------------------------------------------------------------------------------
CLASSIFIER_WIDTHS = (16, 32, 64)
CLASSIFIER_TRAIN = {"images": 16384, "steps": 1200, "batch": 64, "lr": 3e-3, "seed": 0, "data_seed": 11}


def classifier(widths: tuple[int, int, int] = CLASSIFIER_WIDTHS) -> nn.Module:
    """Six 3×3 conv + BN + ReLU blocks (two per width, max-pool between widths), global average pool, linear."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    a, b, c = widths
    return nn.Sequential(*block(3, a), *block(a, a), nn.MaxPool2d(2), *block(a, b), *block(b, b),
                         nn.MaxPool2d(2), *block(b, c), *block(c, c), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(c, 3))


def classes_of(masks: Tensor) -> Tensor:
    """The shape class (0..2) covering most pixels of each image."""
    counts = torch.stack([(masks == c).flatten(1).sum(1) for c in (1, 2, 3)], 1)
    return counts.argmax(1)


def classifier_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    x, m = make_shapes(n, size=32, seed=seed)
    return x, classes_of(m)


def train_classifier() -> tuple[nn.Module, dict[str, Any]]:
    """The classifier trained on ``CLASSIFIER_TRAIN["images"]`` generated images (each seen about 5 times),
    seeded, one torch thread; cached in ``bench/.cache/`` with its training record (wall and CPU seconds,
    held-out accuracy on 1024 images of seed 12, the majority-class rate of those)."""
    cfg = CLASSIFIER_TRAIN
    tag = f"budget_classifier_w{'-'.join(map(str, CLASSIFIER_WIDTHS))}_s{cfg['steps']}_n{cfg['images']}"
    path, info_path = CACHE / f"{tag}.pt", CACHE / f"{tag}.json"
    torch.manual_seed(cfg["seed"])
    model = classifier()
    if path.exists() and info_path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), {**json.loads(info_path.read_text(encoding="utf-8")), "cached": True}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    load0, w0, c0 = os.getloadavg(), time.perf_counter(), time.process_time()
    x, y = classifier_data(cfg["images"], seed=cfg["data_seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=cfg["steps"])
    g = torch.Generator().manual_seed(cfg["seed"])
    model.train()
    for _ in range(cfg["steps"]):
        idx = torch.randint(0, len(x), (cfg["batch"],), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    info: dict[str, Any] = {**cfg, "widths": list(CLASSIFIER_WIDTHS), "train_wall_s": time.perf_counter() - w0,
                            "train_cpu_s": time.process_time() - c0, "final_batch_loss": loss.item(),
                            "load_before": load0, "load_after": os.getloadavg()}
    torch.set_num_threads(threads)
    xt, yt = classifier_data(1024, seed=12)
    info.update(held_out_images=1024, held_out_accuracy=accuracy(model, xt, yt),
                majority_class_rate=float(torch.bincount(yt, minlength=3).max()) / len(yt))
    CACHE.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    info_path.write_text(json.dumps(info, indent=2), encoding="utf-8")
    print(f"trained the classifier: {info}", flush=True)
    return model.eval(), {**info, "cached": False}


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)]).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------------------
# measuring one configuration
# --------------------------------------------------------------------------------------
@torch.no_grad()
def outputs(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    return torch.cat([model(x[i:i + 128]) for i in range(0, len(x), 128)])


def measure(dense: nn.Module, plan: Any, ex: Tensor, calib: list[Tensor], xt: Tensor, ref: Tensor,
            metric: Any) -> dict[str, Any]:
    res = rewrite_with_plan(dense, plan, ex, calibration=calib, with_report=False)
    out = outputs(res.model, xt)
    return {"macs": count_costs(res.model, ex).total_macs,
            "rel_err": float((out.double() - ref.double()).norm() / ref.double().norm()),
            "metric": metric(out), "calib_rel_err": res.calibration.output_rel_error_after,
            "calib_seconds": res.calibration.seconds}


def compare(name: str, dense: nn.Module, ex: Tensor, calib: list[Tensor], xt: Tensor, metric: Any,
            multipliers: tuple[int, ...], extra_fractions: tuple[float, ...] = ()) -> dict[str, Any]:
    ref = outputs(dense, xt)
    total = count_costs(dense, ex).total_macs
    row: dict[str, Any] = {"model": name, "dense_macs": total, "dense_metric": metric(ref), "uniform": [],
                           "budgets": []}
    for kind in ("dw_pw", "pw_dw"):
        for m in multipliers:
            p = plan_rewrite(dense, "all_3x3", ex, depth_multiplier=m, order=kind)
            r = measure(dense, p, ex, calib, xt, ref, metric)
            r.update(config=f"{kind} m={m}")
            row["uniform"].append(r)
            print(f"[{name}] ({time.strftime('%H:%M:%S')}) uniform {kind} m={m}: {r['macs'] / total:.3f} of MACs, rel err {r['rel_err']:.4f}, "
                  f"metric {r['metric']:.4f}", flush=True)
    m2 = next(u["macs"] for u in row["uniform"] if u["config"] == "dw_pw m=2")
    targets = [("uniform dw_pw m=2 MACs", m2), ("half the MACs", total // 2)]
    targets += [(f"{f:g} of the MACs", int(f * total)) for f in extra_fractions]
    for label, target in targets:
        t0 = time.perf_counter()
        bp = plan_with_budget(dense, "all_3x3", ex, parse_budget({"macs": target}), calibration=calib, order="auto")
        plan_s = time.perf_counter() - t0
        r = measure(dense, bp.plan, ex, calib, xt, ref, metric)
        fits = [u for u in row["uniform"] if u["macs"] <= target]
        best = min(fits, key=lambda u: u["rel_err"]) if fits else None
        r.update(target=label, target_macs=target, predicted_err=bp.predicted_error, plan_seconds=plan_s,
                 choices={e.name: (f"{e.config.order} m={e.config.depth_multiplier}" if e.replaced and e.config
                                   else "dense") for e in bp.plan.entries if e.name in
                          {lc.name for lc in bp.problem.layers}},
                 best_uniform=best["config"] if best else None,
                 err_ratio=(r["rel_err"] / best["rel_err"]) if best else None,
                 metric_gain=(r["metric"] - best["metric"]) if best else None)
        row["budgets"].append(r)
        print(f"[{name}] budget {label} ({target:,} MACs): counted {r['macs']:,}, rel err {r['rel_err']:.4f} "
              f"(predicted {bp.predicted_error:.4f}; calib inputs {r['calib_rel_err']:.4f}), metric {r['metric']:.4f}; "
              f"best uniform {r['best_uniform']}: ratio {r['err_ratio']}, metric gain {r['metric_gain']}", flush=True)
    return row


def run_part(name: str, dense: nn.Module, ex: Tensor, calib: list[Tensor], xt: Tensor, metric: Any,
             part: str) -> dict[str, Any]:
    """One configuration: ``uniform:KIND:M`` or ``budget:F`` (F a MAC fraction, or ``m2`` for the MACs of
    uniform dw_pw m=2); the row holds what :func:`merge` needs."""
    ref = outputs(dense, xt)
    total = count_costs(dense, ex).total_macs
    kind_, *rest = part.split(":")
    if kind_ == "uniform":
        k, m = rest[0], int(rest[1])
        r = measure(dense, plan_rewrite(dense, "all_3x3", ex, depth_multiplier=m, order=k), ex, calib, xt, ref, metric)
        r.update(part=part, config=f"{k} m={m}")
    else:
        if rest[0] == "m2":
            p2 = plan_rewrite(dense, "all_3x3", ex, depth_multiplier=2, order="dw_pw")
            target = count_costs(rewrite_with_plan(dense, p2, ex, with_report=False).model, ex).total_macs
            label = "uniform dw_pw m=2 MACs"
        else:
            target, label = int(float(rest[0]) * total), f"{float(rest[0]):g} of the MACs"
        t0 = time.perf_counter()
        bp = plan_with_budget(dense, "all_3x3", ex, parse_budget({"macs": target}), calibration=calib, order="auto")
        plan_s = time.perf_counter() - t0
        r = measure(dense, bp.plan, ex, calib, xt, ref, metric)
        r.update(part=part, target=label, target_macs=target, predicted_err=bp.predicted_error, plan_seconds=plan_s,
                 choices={e.name: (f"{e.config.order} m={e.config.depth_multiplier}" if e.replaced and e.config
                                   else "dense") for e in bp.plan.entries
                          if e.name in {lc.name for lc in bp.problem.layers}})
    r.update(model=name, dense_macs=total, dense_metric=metric(ref), load=os.getloadavg(), time=time.strftime("%H:%M:%S"))
    print(json.dumps(r, default=str), flush=True)
    return r


def merge(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: uniform rows, budget rows with the best uniform within their MACs, ratios."""
    out = []
    for name in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == name]
        uni = sorted((r for r in mine if r["part"].startswith("uniform")), key=lambda r: r["macs"])
        bud = sorted((r for r in mine if r["part"].startswith(("budget", "oracle"))), key=lambda r: r["macs"])
        for b in bud:
            fits = [u for u in uni if u["macs"] <= b["target_macs"]]
            best = min(fits, key=lambda u: u["rel_err"]) if fits else None
            b.update(best_uniform=best["config"] if best else None,
                     err_ratio=(b["rel_err"] / best["rel_err"]) if best else None,
                     metric_gain=(b["metric"] - best["metric"]) if best else None)
        out.append({"model": name, "dense_macs": mine[0]["dense_macs"], "dense_metric": mine[0]["dense_metric"],
                    "uniform": uni, "budgets": bud})
    return out


def table(row: dict[str, Any]) -> str:
    total = row["dense_macs"]
    lines = [f"**{row['model']}**: dense {total:,} MACs, metric {row['dense_metric']:.4f}", "",
             "| configuration | MACs (of dense) | output rel err (held-out) | predicted | metric | best uniform within the MACs | err ratio (≤ 0.7?) | metric gain |",
             "|---|---|---|---|---|---|---|---|"]
    for u in row["uniform"]:
        lines.append(f"| uniform {u['config']} | {u['macs']:,} ({u['macs'] / total:.3f}) | {u['rel_err']:.4f} | – | "
                     f"{u['metric']:.4f} | | | |")
    for b in row["budgets"]:
        ratio = "–" if b["err_ratio"] is None else f"{b['err_ratio']:.3f} ({'met' if b['err_ratio'] <= 0.7 else 'missed'})"
        gain = "–" if b["metric_gain"] is None else f"{b['metric_gain']:+.4f}"
        lines.append(f"| budget: {b['target']} ({b['target_macs']:,}) | {b['macs']:,} ({b['macs'] / total:.3f}) | "
                     f"{b['rel_err']:.4f} | {b['predicted_err']:.4f} | {b['metric']:.4f} | {b['best_uniform']} | "
                     f"{ratio} | {gain} |")
    return "\n".join(lines)


def _timed(fn: Any) -> dict[str, Any]:
    """Run ``fn()``: its wall and process CPU seconds, the load average before and after."""
    load0, w0, c0 = os.getloadavg(), time.perf_counter(), time.process_time()
    value = fn()
    return {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0, "load_before": load0,
            "load_after": os.getloadavg(), "ended_at": time.strftime("%H:%M:%S"), "value": value}


def time_planning(images: int = 64, size: int = 256, batch: int = 8) -> dict[str, Any]:
    """One planning with data sensitivity against one calibration on the demo U-Net, in one process, one thread.

    Interleaved so that both see the same load: calibration, planning, calibration again (each calibration
    on a fresh copy of the same uncalibrated m=1 rewrite). Each step records its wall time and the process's
    CPU time (``time.process_time``; with one torch thread that is the work done, whatever the load); the
    ratios divide the planning by the mean of the two calibrations.
    """
    from dsrewrite.calibrate import calibrate, replaced_names
    from dsrewrite.demo import demo_unet

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = demo_unet(num_classes=4).eval()
    x, _ = make_shapes(images, size=size, seed=7)
    batches = [x[i:i + batch] for i in range(0, images, batch)]
    ex = x[:1]
    p = plan_rewrite(dense, "all_3x3", ex, depth_multiplier=1, order="dw_pw")
    light = rewrite_with_plan(dense, p, ex, with_report=False).model
    names = replaced_names(dense, light)

    def calibration() -> None:
        calibrate(dense, copy.deepcopy(light), batches, names=names)

    def planning() -> Any:
        return plan_with_budget(dense, "all_3x3", ex, parse_budget({"macs": 0.5}), calibration=batches, order="auto")

    steps, bp = [], None
    for label, fn in (("calibration", calibration), ("planning", planning), ("calibration", calibration)):
        t = _timed(fn)
        bp = t.pop("value") or bp
        steps.append({"step": label, **t})
        print(f"timing: {label}: {t}", flush=True)
    cal = [s for s in steps if s["step"] == "calibration"]
    plan = steps[1]
    cal_wall = sum(s["wall_s"] for s in cal) / len(cal)
    cal_cpu = sum(s["cpu_s"] for s in cal) / len(cal)
    return {"images": images, "size": size, "batch": batch, "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "steps": steps,
            "calibration_wall_s_mean": cal_wall, "calibration_cpu_s_mean": cal_cpu,
            "planning_wall_s": plan["wall_s"], "planning_cpu_s": plan["cpu_s"],
            "ratio_wall": plan["wall_s"] / cal_wall, "ratio_cpu": plan["cpu_s"] / cal_cpu,
            "sensitivity_seconds": bp.sensitivity.seconds, "convs": len(bp.problem.layers),
            "candidates": sum(len(l.candidates) for l in bp.problem.layers)}


def plot_row(row: dict[str, Any]) -> None:
    """The Pareto plot of one model (docs/budget_<model>.png): budget plans, uniform configurations."""
    from dsrewrite.budget.sweep import SweepPoint, save_sweep_plot, sweep_table

    pts = [SweepPoint("budget", b["target"], b["macs"], 0, b["predicted_err"], b["rel_err"])
           for b in sorted(row["budgets"], key=lambda b: b["macs"]) if b.get("part", "budget").startswith("budget")]
    pts += [SweepPoint("uniform", u["config"], u["macs"], 0, None, u["rel_err"]) for u in row["uniform"]]
    name = row["model"].split()[-1].lower().replace("-", "")
    save_sweep_plot(pts, DOCS / f"budget_{name}.png",
                    title=f"{row['model']}, all_3x3: held-out output error after calibration vs MACs")
    print(sweep_table(pts, row["dense_macs"]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--only", choices=["unet", "classifier", "timing"], default=None,
                    help="one part (they can run as separate processes; then --plot merges their JSON files)")
    ap.add_argument("--held-out", type=int, default=512, help="held-out images per model")
    ap.add_argument("--plot", nargs="*", default=None, metavar="JSON",
                    help="only redraw the plots and tables from these result files")
    ap.add_argument("--multipliers", default="1,2,3")
    ap.add_argument("--part", action="append", default=None,
                    help="run only these configurations (uniform:KIND:M, budget:F or budget:m2) and print one JSON "
                         "line each; with --only unet/classifier")
    ap.add_argument("--merge", nargs="*", default=None, metavar="LOG",
                    help="merge the JSON lines of --part runs: tables and plots")
    ap.add_argument("--out", default=str(CACHE / "budget_results.json"))
    args = ap.parse_args()
    if args.merge is not None:
        rows = [json.loads(line) for f in args.merge for line in Path(f).read_text(encoding="utf-8").splitlines()
                if line.startswith("{")]
        for row in merge(rows):
            print(table(row), "\n", flush=True)
            plot_row(row)
        return
    if args.part:
        torch.manual_seed(0)
        if args.only == "unet":
            dense = trained_unet()
            xt, yt = held_out(args.held_out)
            c = calibration_images(64)
            calib, metric = [c[i:i + 16] for i in range(0, 64, 16)], lambda out: miou(confusion(out.argmax(1), yt))
            name = "shapes U-Net"
        else:
            dense, info = train_classifier()
            print(f"classifier: {info}", flush=True)
            xt, yt = classifier_data(args.held_out, seed=12)
            xc, _ = classifier_data(64, seed=13)
            calib, metric = [xc[i:i + 16] for i in range(0, 64, 16)], lambda out: float((out.argmax(1) == yt).float().mean())
            name = "classifier"
        for part in args.part:
            run_part(name, dense, xt[:1], calib, xt, metric, part)
        return
    if args.plot is not None:
        for f in args.plot:
            for row in json.loads(Path(f).read_text(encoding="utf-8"))["models"]:
                plot_row(row)
        return
    torch.manual_seed(0)
    mults = tuple(int(v) for v in args.multipliers.split(","))
    results: dict[str, Any] = {"load_at_start": os.getloadavg(), "cpus": os.cpu_count(),
                               "torch_threads": torch.get_num_threads(), "models": []}
    calib_u = calibration_images(64)
    calib_u = [calib_u[i:i + 16] for i in range(0, 64, 16)]
    calib_u = calib_u if args.only in (None, "unet") else []
    if args.only in (None, "unet"):
        unet = trained_unet()
        xt, yt = held_out(args.held_out)

        def miou_of(out: Tensor) -> float:
            return miou(confusion(out.argmax(1), yt))

        results["models"].append(compare("shapes U-Net", unet, xt[:1], calib_u, xt, miou_of, mults,
                                         () if args.skip_sweep else (0.25, 0.4, 0.65)))
    if args.only in (None, "classifier"):
        clf, train_info = train_classifier()
        xt, yt = classifier_data(args.held_out, seed=12)
        xc, _ = classifier_data(64, seed=13)
        row = compare("classifier", clf, xt[:1], [xc[i:i + 16] for i in range(0, 64, 16)], xt,
                      lambda out: float((out.argmax(1) == yt).float().mean()), mults, () if args.skip_sweep else (0.25, 0.4, 0.65))
        row["training"] = train_info
        results["models"].append(row)
    if not args.skip_timing and args.only in (None, "timing"):
        results["timing"] = time_planning()
        print(f"timing: {results['timing']}", flush=True)
    for row in results["models"]:
        plot_row(row)
    results["load_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
