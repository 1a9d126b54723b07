"""Peak resident memory of rewriting a large model, in units of the model's own size.

Each measurement runs in a fresh interpreter: build the model (random weights, no
download), take the baseline, run one scenario, read the peak. On Linux the peak
is ``VmHWM`` of ``/proc/self/status`` after resetting it to the current RSS through
``/proc/self/clear_refs`` (so model construction's own transient does not count);
elsewhere ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak since start). Torch
CPU tensors live outside Python's allocator, so tracemalloc would see none of this.

Before the baseline, one forward pass and one small SVD run, so that loading
kernels and LAPACK code (a fixed few tens of MiB, not a copy of anything) is not
counted. Scenarios (``SCENARIOS``): a plain forward pass and a ``copy.deepcopy`` as
references (activations; exactly one extra copy), then planning, ``rewrite``
(default, copies the model), ``rewrite(inplace=True)``, ``rewrite_and_report`` and
rewrite + ``save_rewrite`` (what ``dsrewrite apply`` does).

Usage::

    .venv/bin/python bench/memory.py                       # vgg16, 1×3×64×64, every scenario
    .venv/bin/python bench/memory.py --model smp:Unet:resnet34 --scenario rewrite --json out.json

Prints a Markdown table: peak − baseline in MiB and in model sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["SCENARIOS", "measure", "main"]

SCENARIOS: dict[str, str] = {
    "forward": "one forward pass under no_grad (the activations, for reference)",
    "deepcopy": "copy.deepcopy(model) (exactly one extra copy, for reference)",
    "plan": "dsrewrite.plan (capture: hooks, fx trace; no copy expected)",
    "rewrite": "dsrewrite.rewrite(model, recipe) (copies the model: ~1 copy expected)",
    "rewrite_inplace": "dsrewrite.rewrite(model, recipe, inplace=True) (no copy expected)",
    "rewrite_and_report": "dsrewrite.rewrite_and_report (copy + the report's forward passes)",
    "rewrite_and_save": "rewrite + save_rewrite to a temp dir (what `dsrewrite apply` does)",
}


def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_kib() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB on Linux


def _child(model_name: str, scenario: str, recipe: str, shape: tuple[int, ...]) -> dict[str, Any]:
    import copy
    import gc
    import tempfile

    import torch

    import dsrewrite
    from dsrewrite.io import build_arch, save_rewrite
    from dsrewrite.planner import plan

    torch.manual_seed(0)
    spec = model_name if ":" in model_name else f"torchvision:{model_name}"
    model = build_arch(spec).eval()  # random weights, never a download
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    gc.collect()
    with torch.no_grad():  # warm up kernels, libraries and allocator once: their first use is not a copy
        model(x)
        torch.linalg.svd(torch.randn(4, 8, 9, dtype=torch.float64), full_matrices=False)
    gc.collect()
    exact = _reset_peak()
    base_kib = _status_kib("VmRSS") if exact else _maxrss_kib()
    keep: list[Any] = []  # results stay alive until the peak is read
    actions: dict[str, Callable[[], Any]] = {
        "forward": lambda: torch.no_grad()(model)(x),
        "deepcopy": lambda: copy.deepcopy(model),
        "plan": lambda: plan(model, recipe, x),
        "rewrite": lambda: dsrewrite.rewrite(model, recipe, example_inputs=x),
        "rewrite_inplace": lambda: dsrewrite.rewrite(model, recipe, example_inputs=x, inplace=True),
        "rewrite_and_report": lambda: dsrewrite.rewrite_and_report(model, recipe, example_inputs=x),
    }

    def rewrite_and_save() -> Any:
        res = dsrewrite.rewrite_and_report(model, recipe, example_inputs=x)
        with tempfile.TemporaryDirectory() as d:
            save_rewrite(res.model, res.plan, Path(d) / "out.pt")
        return res

    actions["rewrite_and_save"] = rewrite_and_save
    t0 = time.perf_counter()
    keep.append(actions[scenario]())
    seconds = time.perf_counter() - t0
    peak_kib = (_status_kib("VmHWM") if exact else None) or _maxrss_kib()
    extra = (peak_kib - base_kib) * 1024
    return {
        "model": model_name,
        "input_shape": list(shape),
        "recipe": recipe,
        "scenario": scenario,
        "model_mib": round(model_bytes / 2**20, 1),
        "baseline_rss_mib": round(base_kib / 1024, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "extra_mib": round(extra / 2**20, 1),
        "extra_model_copies": round(extra / model_bytes, 3),
        "seconds": round(seconds, 2),
        "method": "VmHWM after clear_refs" if exact else "ru_maxrss",
        "torch": torch.__version__,
    }


def measure(model: str, scenario: str, recipe: str = "all_3x3", input_shape: tuple[int, ...] = (1, 3, 64, 64),
            timeout: float = 900.0) -> dict[str, Any]:
    """Run one scenario in a fresh interpreter and return its record.

    Example (slow: builds the model in a subprocess):
        >>> measure("resnet18", "deepcopy")["extra_model_copies"] > 0.9  # doctest: +SKIP
        True
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {sorted(SCENARIOS)}")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", scenario, "--model", model, "--recipe", recipe,
           "--input-shape", ",".join(map(str, input_shape))]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"scenario {scenario!r} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict[str, Any]]) -> str:
    head = "| scenario | peak − baseline (MiB) | in model sizes | time (s) |\n|---|---:|---:|---:|"
    lines = [f"| {r['scenario']} | {r['extra_mib']:.0f} | {r['extra_model_copies']:.2f} | {r['seconds']:.1f} |"
             for r in rows]
    return "\n".join([head, *lines])


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: run the scenarios, print a Markdown table (and optionally write JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vgg16",
                    help="torchvision model name, or an arch spec (smp:Unet:resnet34, timm:NAME); random weights")
    ap.add_argument("--recipe", default="all_3x3")
    ap.add_argument("--input-shape", default="1,3,64,64")
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="repeatable; default: all")
    ap.add_argument("--json", dest="json_path", default=None, help="write every record to this JSON file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.input_shape.split(","))
    if args.child:
        print(json.dumps(_child(args.model, args.child, args.recipe, shape)))
        return 0
    rows = []
    for scenario in args.scenario or list(SCENARIOS):
        rec = measure(args.model, scenario, args.recipe, shape)
        rows.append(rec)
        print(f"{scenario:<20} +{rec['extra_mib']:8.1f} MiB = {rec['extra_model_copies']:.2f} × model "
              f"({rec['model_mib']} MiB), {rec['seconds']:.1f} s", file=sys.stderr)
    first = rows[0]
    print(f"{first['model']} ({first['model_mib']} MiB of parameters and buffers), input {first['input_shape']}, "
          f"recipe {first['recipe']}, torch {first['torch']}, peak by {first['method']}\n")
    print(_table(rows))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
