"""Latency of 3-D rewrites on CPU: per layer and for MONAI's BasicUNet, NCDHW vs channels_last_3d, eager and ONNX Runtime.

Not a test. Random weights, nothing downloaded. Every comparison is
``dsrewrite.measure.latency.compare_latency`` (dense and separable called alternately; the
ratio is the median of per-round ratios separable/dense, < 1: the rewrite is faster), except
the ONNX Runtime rows, which alternate the two sessions the same way here.

* ``layers``: one ``Conv3d(C, C, 3, padding=1)`` against its ``dw_pw`` and ``pw_dw`` blocks at
  m=1, both in NCDHW, both in channels_last_3d, and the cross pair (dense in its faster
  layout vs the block in channels_last_3d).
* ``model``: MONAI ``BasicUNet`` (features 16,16,32,32,64,16) with ``decoder_only`` at m=1:
  eager NCDHW, eager channels_last_3d, ONNX Runtime (CPU EP, NCDHW: ORT has no channels-last
  input layout for Conv).

Reproduce (the numbers in docs/latency.md, "3-D")::

    OMP_NUM_THREADS=1 .venv/bin/python bench/latency_3d.py --threads 1 --rounds 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsrewrite.kinds import get_kind  # noqa: E402
from dsrewrite.measure.latency import compare_latency  # noqa: E402
from dsrewrite.planning.apply import apply_plan  # noqa: E402
from dsrewrite.planning.planner import plan  # noqa: E402
from dsrewrite.planning.types import LayerConfig  # noqa: E402


def layer_rows(rounds: int) -> list[dict]:
    rows = []
    for c, s in ((32, 32), (64, 16), (16, 64)):
        torch.manual_seed(0)
        dense = nn.Conv3d(c, c, 3, padding=1).eval()
        x = torch.randn(1, c, s, s, s)
        for order in ("dw_pw", "pw_dw"):
            block = get_kind(order).build(dense, LayerConfig(order=order, depth_multiplier=1)).eval()
            row = {"C": c, "size": s, "order": order}
            for cl in (False, True):
                r = compare_latency(dense, block, x, rounds=rounds, warmup=3, channels_last=cl)
                key = "cl3d" if cl else "ncdhw"
                row[f"dense_{key}_ms"], row[f"sep_{key}_ms"], row[f"ratio_{key}"] = \
                    r.median_a_ms, r.median_b_ms, r.ratio
            best_dense = min(row["dense_ncdhw_ms"], row["dense_cl3d_ms"])
            row["best_vs_best"] = row["sep_cl3d_ms"] / best_dense
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _ort_times(path_a: str, path_b: str, x: torch.Tensor, rounds: int) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    a = ort.InferenceSession(path_a, opts, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(path_b, opts, providers=["CPUExecutionProvider"])
    feed = {a.get_inputs()[0].name: x.numpy()}
    feed_b = {b.get_inputs()[0].name: x.numpy()}
    for _ in range(3):
        a.run(None, feed), b.run(None, feed_b)
    ta, tb = [], []
    for _ in range(rounds):
        t = time.perf_counter(); a.run(None, feed); ta.append(time.perf_counter() - t)
        t = time.perf_counter(); b.run(None, feed_b); tb.append(time.perf_counter() - t)
    return {"dense_ms": 1e3 * statistics.median(ta), "sep_ms": 1e3 * statistics.median(tb),
            "ratio": statistics.median(y / x_ for x_, y in zip(ta, tb))}


def model_rows(rounds: int, size: int) -> list[dict]:
    from monai.networks.nets import BasicUNet

    from dsrewrite.deploy.onnx import export_onnx

    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(16, 16, 32, 32, 64, 16)).eval()
    x = torch.randn(1, 1, size, size, size)
    light = apply_plan(net, plan(net, "decoder_only", x)).eval()
    rows = []
    for cl in (False, True):
        r = compare_latency(net, light, x, rounds=rounds, warmup=2, channels_last=cl)
        row = {"model": "BasicUNet decoder_only m=1", "size": size, "backend": "eager " + ("cl3d" if cl else "ncdhw"),
               "dense_ms": r.median_a_ms, "sep_ms": r.median_b_ms, "ratio": r.ratio}
        rows.append(row)
        print(json.dumps(row), flush=True)
    with tempfile.TemporaryDirectory() as d:
        export_onnx(net, x, Path(d) / "a.onnx")
        export_onnx(light, x, Path(d) / "b.onnx")
        row = {"model": "BasicUNet decoder_only m=1", "size": size, "backend": "ort ncdhw",
               **_ort_times(str(Path(d) / "a.onnx"), str(Path(d) / "b.onnx"), x, rounds)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--size", type=int, default=32, help="BasicUNet input edge (voxels)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = {"threads": a.threads, "torch": torch.__version__}
    if not a.skip_layers:
        out["layers"] = layer_rows(a.rounds)
    if not a.skip_model:
        out["model"] = model_rows(a.rounds, a.size)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
