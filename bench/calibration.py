"""Calibration benchmark: does calibration (closed form) and healing (distillation) keep a rewritten U-Net faithful?

One command, from the repository root:

    .venv/bin/python -m bench.calibration            # full run (~50 min on 2 CPU cores; +40 min training when not cached)
    .venv/bin/python -m bench.calibration --quick    # smoke run (fewer configs, fewer steps)
    .venv/bin/python -m bench.calibration --only decoder_only:1:pw_dw --heal-steps 0 --alternate 12   # one ablation

1. Trains (or loads from ``bench/.cache/``) the small shapes U-Net of
   :mod:`bench.train_unet` and measures its test mIoU.
2. For each recipe (``decoder_only``, ``all_3x3``), depth multiplier (1, 2) and order
   (``dw_pw``, ``pw_dw``) rewrites it with :func:`dsrewrite.rewrite` (SVD init and
   random init), calibrates the SVD rewrite on 64 unlabeled training images
   (:func:`dsrewrite.calibrate.calibrate`) and heals the calibrated model for N steps
   (:func:`dsrewrite.heal.heal`) on unlabeled training images. Reports MAC reduction,
   output relative L2 error against the dense model's logits on the held-out test set,
   and test mIoU for every variant.
3. Times calibration of the embedded demo U-Net (ResNet18 encoder, ``dsrewrite.demo``)
   on 64 images of 256×256, ``all_3x3`` and ``decoder_only`` (m = 1, dw_pw).

Results go to ``bench/.cache/calibration_results.{json,md}`` and stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # `python bench/calibration.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import Tensor, nn

from bench.shapes_data import make_shapes
from bench.train_unet import CACHE_DIR, data_splits, evaluate_miou, train_or_load
from dsrewrite.api import rewrite
from dsrewrite.calibrate import calibrate, replaced_names
from dsrewrite.heal import heal
from dsrewrite.macs import count_costs

RECIPES = ("decoder_only", "all_3x3")
MULTIPLIERS = (1, 2)
ORDERS = ("dw_pw", "pw_dw")
HEAL_BATCH = 16
HEAL_STEPS = 1000


@torch.no_grad()
def rel_error(model: nn.Module, ref_logits: Tensor, x: Tensor, batch: int = 128) -> float:
    """Relative L2 error of ``model``'s logits against the dense model's on ``x``."""
    model.eval()
    out = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
    return float((out.double() - ref_logits.double()).norm() / ref_logits.double().norm())


def variant_metrics(model: nn.Module, ref_logits: Tensor, xte: Tensor, yte: Tensor) -> dict[str, float]:
    return {"rel_err": rel_error(model, ref_logits, xte), "miou": evaluate_miou(model, xte, yte)}


def run_config(dense: nn.Module, recipe: str, m: int, order: str, *, calib: list[Tensor], heal_data: list[Tensor],
               heal_steps: int, heal_lr: float, heal_loss: str, layer_weight: float, xte: Tensor, yte: Tensor,
               ref_logits: Tensor, dense_macs: int, calib_options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    example = xte[:1]
    svd = rewrite(dense, recipe, example_inputs=example, depth_multiplier=m, order=order, init="svd")
    torch.manual_seed(0)
    rnd = rewrite(dense, recipe, example_inputs=example, depth_multiplier=m, order=order, init="random")
    names = replaced_names(dense, svd)
    macs = count_costs(svd, example).total_macs
    row: dict[str, Any] = {"recipe": recipe, "m": m, "order": order, "layers": len(names),
                           "macs": macs, "mac_reduction": dense_macs / macs}
    row["svd"] = variant_metrics(svd, ref_logits, xte, yte)
    row["random"] = variant_metrics(rnd, ref_logits, xte, yte)
    cal = copy.deepcopy(svd)
    res = calibrate(dense, cal, calib, names=names, **(calib_options or {}))
    row["calibrated"] = variant_metrics(cal, ref_logits, xte, yte)
    row["calibration"] = {
        "options": calib_options or {}, "seconds": res.seconds, "output_rel_err_calib_before": res.output_rel_error_before,
        "output_rel_err_calib_after": res.output_rel_error_after,
        "layers": [{"name": l.name, "method": l.method, "before": l.rel_error_before,
                    "after": l.rel_error_after, "steps": list(l.steps), "note": l.note, "activation": l.activation,
                    "act_before": l.act_error_before, "act_after": l.act_error_after} for l in res.layers],
    }
    if heal_steps == 0:
        row["healed"], row["heal"] = None, None
        return row
    healed = copy.deepcopy(cal)
    torch.manual_seed(0)
    hres = heal(healed, dense, heal_data, steps=heal_steps, lr=heal_lr, names=names, schedule="cosine",
                warmup=max(1, heal_steps // 20), layer_weight=layer_weight, output_loss=heal_loss, progress=False)
    row["healed"] = variant_metrics(healed, ref_logits, xte, yte)
    row["heal"] = {"steps": heal_steps, "lr": heal_lr, "schedule": "cosine", "warmup": max(1, heal_steps // 20),
                   "layer_weight": layer_weight, "output_loss": heal_loss, "batch": HEAL_BATCH, "seconds": hres.seconds,
                   "loss_first": hres.losses[0] if hres.losses else None,
                   "loss_last": hres.losses[-1] if hres.losses else None}
    return row


def time_demo_unet(recipe: str, images: int, size: int, batch: int) -> dict[str, Any]:
    """Calibrate the full-size demo U-Net (random weights: timing does not depend on them)."""
    from dsrewrite.demo import demo_unet

    torch.manual_seed(0)
    dense = demo_unet(num_classes=4).eval()
    x, _ = make_shapes(images, size=size, seed=7)
    batches = [x[i : i + batch] for i in range(0, images, batch)]
    light = rewrite(dense, recipe, example_inputs=x[:1], depth_multiplier=1, order="dw_pw")
    names = replaced_names(dense, light)
    t0 = time.perf_counter()
    res = calibrate(dense, light, batches, names=names, progress=True)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            dense(b)
    fwd = time.perf_counter() - t1
    return {"recipe": recipe, "images": images, "size": size, "layers": len(names), "seconds": wall,
            "dense_forward_pass_seconds": fwd, "output_rel_err_before": res.output_rel_error_before,
            "output_rel_err_after": res.output_rel_error_after, "replay_cache": res.replay_cache,
            "alternating_layers": sum(l.method == "alternating" for l in res.layers)}


def _num(variant: Optional[dict[str, float]], key: str, scale: float) -> str:
    """A table cell: ``variant[key]·scale``, or "–" for a variant not run (``--heal-steps 0``)."""
    if variant is None:
        return "–"
    return f"{scale * variant[key]:.{3 if scale == 1 else 2}f}"


def markdown(results: dict[str, Any]) -> str:
    lines = []
    d = results["dense"]
    lines.append(f"Dense model: test mIoU {100 * d['miou']:.2f}, {d['macs'] / 1e6:.1f} M MACs per 64×64 image "
                 f"(trained {d['train_seconds']:.0f} s{', cached' if d['cached'] else ''}).")
    lines.append("")
    lines.append("| recipe | m | order | layers | MAC reduction | rel err SVD | rel err random | rel err calibrated "
                 "| rel err healed | mIoU SVD | mIoU random | mIoU calibrated | mIoU healed | calib ≤ ½ SVD |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["configs"]:
        ok = r["calibrated"]["rel_err"] <= 0.5 * r["svd"]["rel_err"]
        lines.append(
            f"| {r['recipe']} | {r['m']} | {r['order']} | {r['layers']} | {r['mac_reduction']:.2f}× | "
            f"{r['svd']['rel_err']:.3f} | {r['random']['rel_err']:.3f} | {r['calibrated']['rel_err']:.3f} | "
            f"{_num(r['healed'], 'rel_err', 1)} | {100 * r['svd']['miou']:.2f} | {100 * r['random']['miou']:.2f} | "
            f"{100 * r['calibrated']['miou']:.2f} | {_num(r['healed'], 'miou', 100)} | {'yes' if ok else 'NO'} |"
        )
    st = results["setup"]
    lines.append("")
    lines.append(f"Healing: {st['heal_steps']} steps of batch {st['heal_batch']} unlabeled training images, Adam, "
                 f"peak lr {st['heal_lr']:g} (warm-up, cosine decay), output loss {st.get('heal_loss', 'mse')}, "
                 f"layer weight {st.get('layer_weight', 0.1):g}; {st['threads']} torch threads.")
    lines.append("")
    lines.append("Targets:")
    configs = results["configs"]
    if configs:
        worst = max(r["calibrated"]["rel_err"] / r["svd"]["rel_err"] for r in configs)
        lines.append(f"- calibrated output error ≤ ½ SVD's on every configuration: worst ratio {worst:.2f} "
                     f"→ {'met' if worst <= 0.5 else 'NOT met'}")
    dense_miou = 100 * d["miou"]
    for r in configs:
        if r["recipe"] == "decoder_only" and r["m"] == 1 and r["healed"]:
            gap = dense_miou - 100 * r["healed"]["miou"]
            lines.append(f"- healed mIoU within 0.5 points of dense, decoder_only m=1 {r['order']}: "
                         f"{100 * r['healed']['miou']:.2f} vs {dense_miou:.2f} (gap {gap:.2f}) "
                         f"→ {'met' if gap <= 0.5 else 'NOT met'}")
    for t in results["timing"]:
        lines.append(f"- whole-U-Net calibration, {t['images']} images of {t['size']}², {t['recipe']}: "
                     f"{t['seconds']:.1f} s → {'met' if t['seconds'] < 60 else 'NOT met'} (< 60 s)")
    lines.append("")
    lines.append("| demo U-Net (ResNet18) calibration | images | layers | seconds | one dense forward pass (s) "
                 "| output rel err before → after |")
    lines.append("|---|---|---|---|---|---|")
    for t in results["timing"]:
        lines.append(f"| {t['recipe']} | {t['images']}×{t['size']}² | {t['layers']} | {t['seconds']:.1f} | "
                     f"{t['dense_forward_pass_seconds']:.1f} | {t['output_rel_err_before']:.3f} → "
                     f"{t['output_rel_err_after']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: m=1 only, 20 heal steps, 16 timing images")
    ap.add_argument("--heal-steps", type=int, default=None, help=f"healing steps per configuration (default {HEAL_STEPS})")
    ap.add_argument("--heal-lr", type=float, default=3e-3, help="peak Adam learning rate (warm-up, cosine decay)")
    ap.add_argument("--heal-loss", choices=("kl", "mse"), default="mse", help="output loss of heal() (default mse)")
    ap.add_argument("--layer-weight", type=float, default=0.0, help="weight of the per-layer terms (default 0: output loss only)")
    ap.add_argument("--alternate", type=int, default=None, help="calibrate(alternate=...) (default: calibrate's)")
    ap.add_argument("--ridge", type=float, default=None, help="calibrate(ridge=...) (default: calibrate's)")
    ap.add_argument("--max-positions", type=int, default=None, help="calibrate(max_positions=...) (default: calibrate's)")
    ap.add_argument("--activation", choices=("auto", "none"), default=None,
                    help="calibrate(activation=...) (default: calibrate's)")
    ap.add_argument("--no-timing", action="store_true", help="skip the 256×256 demo U-Net timing")
    ap.add_argument("--timing-only", action="store_true",
                    help="only the demo U-Net timing, merged into an existing results file (run it on an idle machine)")
    ap.add_argument("--only", action="append", default=[], metavar="RECIPE:M:ORDER",
                    help="run only these configurations, e.g. decoder_only:1:dw_pw (repeatable)")
    ap.add_argument("--out", type=Path, default=CACHE_DIR / "calibration_results")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    heal_steps = args.heal_steps if args.heal_steps is not None else (20 if args.quick else HEAL_STEPS)
    calib_options = {k: v for k, v in (("alternate", args.alternate), ("ridge", args.ridge),
                                        ("max_positions", args.max_positions),
                                        ("activation", args.activation)) if v is not None}

    def save(res: dict[str, Any]) -> None:  # after every configuration: partial results survive
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float))

    def timing(res: dict[str, Any]) -> None:
        n = 16 if args.quick else 64
        res["timing"] = []
        for recipe in ("all_3x3", "decoder_only"):
            t = time_demo_unet(recipe, images=n, size=256, batch=16)
            t["threads"] = torch.get_num_threads()
            res["timing"].append(t)
            save(res)
            print(f"demo U-Net {recipe} {n}×256²: calibration {t['seconds']:.1f} s", flush=True)

    def finish(res: dict[str, Any]) -> int:
        save(res)
        md = markdown(res)
        args.out.with_suffix(".md").write_text(md + "\n")
        print(md)
        print(f"results in {args.out.with_suffix('.json')}")
        return 0

    if args.timing_only:
        results = json.loads(args.out.with_suffix(".json").read_text())
        timing(results)
        return finish(results)

    splits = data_splits()
    dense, record = train_or_load(splits=splits)
    xtr, _ = splits["train"]
    xte, yte = splits["test"]
    calib = [xtr[i : i + 16] for i in range(0, 64, 16)]  # 64 unlabeled images
    # unlabeled healing batches, disjoint from the calibration images
    heal_data = [xtr[i : i + HEAL_BATCH] for i in range(64, len(xtr) - HEAL_BATCH + 1, HEAL_BATCH)]
    with torch.no_grad():
        ref_logits = torch.cat([dense(xte[i : i + 128]) for i in range(0, len(xte), 128)])
    dense_macs = count_costs(dense, xte[:1]).total_macs
    results: dict[str, Any] = {
        "dense": {"miou": evaluate_miou(dense, xte, yte), "macs": dense_macs,
                  "train_seconds": record["train_seconds"], "cached": record.get("cached", False)},
        "setup": {"calibration_images": 64, "heal_steps": heal_steps, "heal_batch": HEAL_BATCH,
                  "heal_lr": args.heal_lr, "heal_loss": args.heal_loss, "layer_weight": args.layer_weight,
                  "test_images": len(xte), "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "machine": platform.machine(), "cpus": os.cpu_count()},
        "configs": [], "timing": [],
    }
    print(f"dense mIoU {100 * results['dense']['miou']:.2f}", flush=True)
    if not args.no_timing:
        timing(results)
    for recipe in RECIPES:
        for m in (1,) if args.quick else MULTIPLIERS:
            for order in ORDERS:
                if args.only and f"{recipe}:{m}:{order}" not in args.only:
                    continue
                t0 = time.perf_counter()
                row = run_config(dense, recipe, m, order, calib=calib, heal_data=heal_data, heal_steps=heal_steps,
                                 heal_lr=args.heal_lr, heal_loss=args.heal_loss, layer_weight=args.layer_weight,
                                 xte=xte, yte=yte, ref_logits=ref_logits, dense_macs=dense_macs,
                                 calib_options=calib_options)
                results["configs"].append(row)
                save(results)
                healed = row["healed"] or {"rel_err": float("nan"), "miou": float("nan")}
                print(f"{recipe} m={m} {order}: MACs /{row['mac_reduction']:.2f}  rel err svd "
                      f"{row['svd']['rel_err']:.3f} cal {row['calibrated']['rel_err']:.3f} healed "
                      f"{healed['rel_err']:.3f} | mIoU svd {100 * row['svd']['miou']:.2f} cal "
                      f"{100 * row['calibrated']['miou']:.2f} healed {100 * healed['miou']:.2f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    results["total_seconds"] = time.perf_counter() - t_start
    return finish(results)


if __name__ == "__main__":
    sys.exit(main())
