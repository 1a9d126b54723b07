"""Latency of the rewrite in the runtimes it ships to: eager channels_last, ONNX Runtime, ExecuTorch XNNPACK.

smp ``Unet("resnet18")`` (random weights; the embedded demo U-Net when smp is missing), recipe
``decoder_only``, 512×512, batch 1, in the recipe's own order (``dw_pw``) and with ``--order auto``.
Each runtime times the original and the rewrite *exported the same way* (``dsrewrite.deploy.export_model``,
the path of ``dsrewrite export``; the files are checked against eager PyTorch before timing):

* ``eager``      the deployment form (``prepare_for_deployment``: eval, BN folded, hoisted, channels_last);
* ``onnx``       the ``.onnx`` file (dynamic axes, as ``dsrewrite export`` writes it) in ONNX Runtime's CPU EP;
* ``executorch`` the ``.pte`` file (XNNPACK partitioner) in ExecuTorch's runtime (the ``edge`` extra).

Every ratio is ``dsrewrite.measure.latency.compare_latency``: original and rewrite called alternately,
the median of the per-round ratios rewritten/original, with the quartiles of those ratios (the noise).
Threads: ``torch.set_num_threads`` (eager), ``intra_op_num_threads`` (ORT), the XNNPACK threadpool
(``_unsafe_reset_threadpool``, ExecuTorch). The machine's load average (``os.getloadavg``) is recorded
before and after, and written into the table: timings on a busy machine are not comparable to idle ones.

One command writes the table (Markdown) and, optionally, the rows (JSON)::

    .venv/bin/python bench/latency.py --runtimes eager,onnx,executorch --threads 1,2 --out docs/latency-runtimes.md
    .venv/bin/python bench/runtimes.py --runtimes eager,onnx --threads 2 --rounds 5 --out /tmp/r.md  # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Optional

import torch
from torch import nn

import dsrewrite.api as dsr
from dsrewrite.deploy import export_model, prepare_for_deployment
from dsrewrite.latency import compare_latency
from dsrewrite.macs import count_costs

RUNTIMES = ("eager", "onnx", "executorch")
ORDERS = ("recipe", "auto")
#: (order, runtime, threads) -> the ratio the issue asks for (rewritten / original latency).
TARGETS = {("auto", "eager", 2): 0.55, ("auto", "onnx", 2): 0.55, ("auto", "executorch", 2): 0.50,
           ("recipe", "eager", 2): 0.65}


def build_unet() -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    try:
        import segmentation_models_pytorch as smp

        return smp.Unet("resnet18", encoder_weights=None).eval(), "smp Unet(resnet18)"
    except ImportError:
        from dsrewrite.demo import demo_unet

        return demo_unet().eval(), "dsrewrite.demo.demo_unet (smp missing)"


class OrtModel(nn.Module):
    """An ONNX Runtime session behind ``nn.Module.__call__`` (for ``compare_latency``)."""

    def __init__(self, path: str, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.detach().contiguous().numpy()})[0])


class EtModel(nn.Module):
    """An ExecuTorch program's ``forward`` behind ``nn.Module.__call__``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(path).load_method("forward")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.execute([x.contiguous()])[0]


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(n)
    except ImportError:
        pass


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def prepare(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    """Per order: the deployment forms (eager) and the exported files (onnx, executorch), each checked."""
    original, name = build_unet()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.size))
    small = torch.randn(1, 3, 64, 64)
    forms: dict[str, Any] = {"model_name": name, "x": x, "exports": []}
    for order in args.orders:
        rewritten = dsr.rewrite(original, "decoder_only", example_inputs=small,
                                order=None if order == "recipe" else order).eval()
        pair: dict[str, Any] = {}
        deployed = [prepare_for_deployment(m, x) for m in (original, rewritten)]
        xcl = x.contiguous(memory_format=torch.channels_last)
        pair["macs"] = count_costs(deployed[1], xcl).total_macs / count_costs(deployed[0], xcl).total_macs
        pair["eager"] = deployed
        for runtime, suffix in (("onnx", ".onnx"), ("executorch", ".pte")):
            if runtime not in args.runtimes:
                continue
            paths = []
            for tag, m in (("original", original), ("rewritten", rewritten)):
                path = os.path.join(tmp, f"{'any' if tag == 'original' else order}-{tag}{suffix}")
                if os.path.exists(path):  # the original is the same for every order: exported once
                    paths.append(path)
                    continue
                start = time.perf_counter()
                res = export_model(m, x, path, format=runtime)
                forms["exports"].append({"order": order, "model": tag, "runtime": runtime, "summary": str(res),
                                         "export_s": time.perf_counter() - start})
                print(f"  {order} {tag}: {res}", file=sys.stderr, flush=True)
                paths.append(path)
            pair[runtime] = paths
        forms[order] = pair
    return forms


def models_for(forms: dict[str, Any], order: str, runtime: str, threads: int) -> tuple[nn.Module, nn.Module]:
    pair = forms[order][runtime]
    if runtime == "eager":
        return pair[0], pair[1]
    if runtime == "onnx":
        return OrtModel(pair[0], threads), OrtModel(pair[1], threads)
    return EtModel(pair[0]), EtModel(pair[1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsrewrite-runtimes-") as tmp:
        set_threads(max(args.threads))
        forms = prepare(args, tmp)
        x = forms["x"]
        for threads in args.threads:
            set_threads(threads)
            for order in args.orders:
                for runtime in args.runtimes:
                    a, b = models_for(forms, order, runtime, threads)
                    t0 = time.perf_counter()
                    res = compare_latency(a, b, x, rounds=args.rounds, warmup=args.warmup,
                                          channels_last=runtime == "eager")
                    ratios = [tb / ta for ta, tb in zip(res.times_a_ms, res.times_b_ms)]
                    q1, q3 = quartiles(ratios)
                    row = {"order": order, "runtime": runtime, "threads": threads, "ratio": res.ratio, "q1": q1,
                           "q3": q3, "original_ms": res.median_a_ms, "rewritten_ms": res.median_b_ms,
                           "mac_ratio": forms[order]["macs"], "target": TARGETS.get((order, runtime, threads)),
                           "rounds": res.rounds, "wall_s": time.perf_counter() - t0}
                    rows.append(row)
                    print(format_row(row), file=sys.stderr, flush=True)
    return {"model": forms["model_name"], "size": args.size, "rows": rows, "exports": forms["exports"],
            "environment": environment(args), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "wall_s": time.perf_counter() - start, "command": " ".join([f"bench/{os.path.basename(sys.argv[0])}", *sys.argv[1:]])}


RUNTIME_NAMES = {"eager": "eager channels_last (deployment form)", "onnx": "ONNX Runtime (CPU EP)",
                 "executorch": "ExecuTorch (XNNPACK)"}
HEADER = ("| order | runtime | threads | MAC ratio | latency ratio [q1, q3] | original ms | rewritten ms | target | met? |\n"
          "|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict[str, Any]) -> str:
    target, met = "—", "—"
    if r["target"] is not None:
        target = f"≤ {r['target']:.2f}"
        miss = r["ratio"] - r["target"]
        met = "**yes**" if miss <= 0 else f"no (+{miss:.3f})"
    order = "auto" if r["order"] == "auto" else "recipe (dw_pw)"
    return (f"| {order} | {RUNTIME_NAMES[r['runtime']]} | {r['threads']} | {r['mac_ratio']:.3f} | "
            f"**{r['ratio']:.3f}** [{r['q1']:.2f}, {r['q3']:.2f}] | {r['original_ms']:.1f} | {r['rewritten_ms']:.1f} "
            f"| {target} | {met} |")


def environment(args: argparse.Namespace) -> dict[str, Any]:
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    from importlib import metadata

    for mod, dist in (("onnxruntime", "onnxruntime"), ("executorch", "executorch"),
                      ("segmentation_models_pytorch", "segmentation-models-pytorch")):
        try:
            versions[mod] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[mod] = None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {**versions, "cpu": cpu, "cpu_count": os.cpu_count(), "rounds": args.rounds, "warmup": args.warmup}


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lb, la = result["loadavg_before"], result["loadavg_after"]
    lines = [
        f"# Runtime latency: {result['model']}, decoder_only, {result['size']}², batch 1",
        "",
        "Written by `bench/runtimes.py` (rerun with the command below); ratio = rewritten / original, the median "
        "of per-round ratios with original and rewrite called alternately; [q1, q3] their quartiles. Both models "
        "are exported the same way (`dsrewrite export`'s path, checked against eager before timing).",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} CPUs; load average (1, 5, 15 min) before "
        f"{lb[0]:.2f}, {lb[1]:.2f}, {lb[2]:.2f}, after {la[0]:.2f}, {la[1]:.2f}, {la[2]:.2f}"
        + (" — **the machine was busy: these ratios are noisier than on an idle machine**"
           if lb[0] > 0.5 * (env["cpu_count"] or 1) else "")  # "after" includes the bench's own threads
        + f". {env['rounds']} rounds after {env['warmup']} warm-up; wall {result['wall_s']:.0f} s. Versions: "
        + ", ".join(f"{k} {v}" for k, v in env.items() if k in ("torch", "onnxruntime", "executorch",
                                                                 "segmentation_models_pytorch", "python") and v),
        "",
        HEADER,
        *(format_row(r) for r in result["rows"]),
        "",
        "Exports (each checked in its runtime against eager PyTorch before timing):",
        "",
        *(f"* {e['order']} {e['model']}: {e['summary']} ({e['export_s']:.0f} s)" for e in result["exports"]),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    csv = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    p.add_argument("--runtimes", type=csv, default=list(RUNTIMES), help="comma list of: " + ",".join(RUNTIMES))
    p.add_argument("--orders", type=csv, default=list(ORDERS), help="comma list of: " + ",".join(ORDERS))
    p.add_argument("--threads", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="write the Markdown table here (default: stdout only)")
    p.add_argument("--json", default=None, help="write the rows and the environment here")
    args = p.parse_args(argv)
    for name, options in (("runtimes", RUNTIMES), ("orders", ORDERS)):
        bad = [v for v in getattr(args, name) if v not in options]
        if bad:
            p.error(f"--{name}: unknown {bad}; choose from {list(options)}")
    if "executorch" in args.runtimes:
        from dsrewrite.deploy.executorch import INSTALL_HINT, executorch_available

        if not executorch_available():
            p.error(f"--runtimes executorch needs the 'edge' extra: {INSTALL_HINT}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = markdown(result)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
