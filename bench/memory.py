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
import functools
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
    model = build_arch(_spec(model_name)).eval()  # random weights, never a download
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


class _PhaseMeter:
    """Peak RSS per phase of one run: each phase boundary reads ``VmHWM`` then resets it (``clear_refs``).

    Phases nest (``capture`` inside ``plan``); time outside every named phase is ``cli``
    (argument parsing, printing). Every moment of the run belongs to exactly one phase,
    so the largest phase peak is the peak of the whole command.
    """

    def __init__(self, base_kib: int) -> None:
        self.base = base_kib
        self.current = "cli"
        self.rows: dict[str, dict[str, float]] = {}

    def switch(self, name: str) -> None:
        hwm, rss = _status_kib("VmHWM") or 0, _status_kib("VmRSS") or 0
        row = self.rows.setdefault(self.current, {"peak_kib": 0, "end_kib": 0})
        row["peak_kib"] = max(row["peak_kib"], hwm - self.base)
        row["end_kib"] = rss - self.base
        _reset_peak()
        self.current = name

    def wrap(self, module: Any, attr: str, name: str) -> None:
        if "." in attr:  # a method: "Class.method"
            cls, attr = attr.split(".")
            module = getattr(module, cls)
        fn = getattr(module, attr)

        @functools.wraps(fn)  # keeps the signature (calibrate's options are checked against it)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            outer = self.current
            self.switch(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.switch(outer)

        setattr(module, attr, wrapped)


#: (module, attribute, phase) wrapped by the CLI measurement: what ``dsrewrite apply`` calls, in order.
CLI_PHASES: tuple[tuple[str, str, str], ...] = (
    ("dsrewrite.cli.apply", "load_model_arg", "load"),
    ("dsrewrite.cli.apply", "example_inputs_of", "inputs"),
    ("dsrewrite.calib_data", "open_calibration", "calib data"),
    ("dsrewrite.cli.apply", "make_plan", "plan"),
    ("dsrewrite.planning.planner", "capture", "capture"),
    ("dsrewrite.api", "rewrite_with_plan", "rewrite (other)"),
    ("dsrewrite.api", "apply_checked", "apply"),
    ("dsrewrite.refit.calibrate", "calibrate", "calibrate"),
    ("dsrewrite.report", "build_report", "report"),
    ("dsrewrite.io", "save_rewrite", "save"),
    ("dsrewrite.report", "save_report", "report file"),
)

#: With ``--detail``: calibration's own steps, nested in ``calibrate`` (where its peak comes from).
CALIB_PHASES: tuple[tuple[str, str, str], ...] = (
    ("dsrewrite.refit.calibrate", "teacher_pass", "calibrate: teacher pass"),
    ("dsrewrite.refit.calibrate", "_layer_pass", "calibrate: layer passes"),
    ("dsrewrite.refit.layer_fit", "LayerFit.refit", "calibrate: refits"),
    ("dsrewrite.kinds.dw_pw", "refit_dwpw_spatial", "calibrate: dw_pw first-stage solves"),
    ("dsrewrite.refit.layer_fit", "LayerFit.refit_through_relu", "calibrate: fits through ReLU"),
)


def _cli_child(model_name: str, recipe: str, shape: tuple[int, ...], workdir: str, calib: bool,
               detail: bool = False) -> dict[str, Any]:
    """``dsrewrite apply`` in this (fresh) interpreter on the state-dict file the parent wrote, phase by phase."""
    import gc
    import importlib

    import torch

    import dsrewrite.cli

    spec = _spec(model_name)
    d = Path(workdir)
    meta = json.loads((d / "meta.json").read_text())
    with torch.no_grad():  # warm up kernels and LAPACK on a small model, so that their first use is not counted
        small = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                    torch.nn.Linear(8 * 16 * 16, 4))
        small(torch.randn(1, 3, 16, 16))
        torch.linalg.svd(torch.randn(4, 8, 9, dtype=torch.float64), full_matrices=False)
    del small
    # The model's library (timm: ~190 MiB of RSS on import) is imported before the baseline: a fixed
    # cost of the interpreter, not a copy of anything. A tiny model of it is built for that.
    library = spec.split(":")[0]
    importlib.import_module({"smp": "segmentation_models_pytorch"}.get(library, library))
    gc.collect()
    exact = _reset_peak()
    if not exact:
        raise SystemExit("the CLI phase table needs /proc/self/clear_refs (Linux)")
    base_kib = _status_kib("VmRSS") or 0
    meter = _PhaseMeter(base_kib)
    for mod_name, attr, phase in CLI_PHASES + (CALIB_PHASES if detail else ()):
        meter.wrap(importlib.import_module(mod_name), attr, phase)
    out = d / "out.pt"
    for p in (out, out.with_suffix(".plan.json"), d / "report.json"):
        p.unlink(missing_ok=True)
    args = ["apply", str(d / "model.pt"), "--arch", spec, "--recipe", recipe,
            "--input-shape", ",".join(map(str, shape)), "-o", str(out), "--report", str(d / "report.json")]
    if calib:
        args += ["--calib", str(d / "calib.pt")]
    t0 = time.perf_counter()
    dsrewrite.cli.main(args, standalone_mode=False)
    seconds = time.perf_counter() - t0
    meter.switch("end")
    model_bytes = meta["model_bytes"]
    phases = [{"phase": k, "peak_mib": round(v["peak_kib"] / 1024, 1), "peak_models": round(v["peak_kib"] * 1024 / model_bytes, 3),
               "end_mib": round(v["end_kib"] / 1024, 1), "end_models": round(v["end_kib"] * 1024 / model_bytes, 3)}
              for k, v in meter.rows.items()]
    peak = max(v["peak_kib"] for v in meter.rows.values()) * 1024
    return {"model": model_name, "input_shape": list(shape), "recipe": recipe, "scenario": "cli_apply" + ("_calib" if calib else ""),
            "model_mib": round(model_bytes / 2**20, 1), "baseline_rss_mib": round(base_kib / 1024, 1),
            "extra_mib": round(peak / 2**20, 1), "extra_model_copies": round(peak / model_bytes, 3),
            "seconds": round(seconds, 2), "phases": phases, "method": "VmHWM after clear_refs, per phase",
            "torch": torch.__version__}


def _spec(model_name: str) -> str:
    return model_name if ":" in model_name else f"torchvision:{model_name}"


def measure_cli(model: str, recipe: str = "all_3x3", input_shape: tuple[int, ...] = (1, 3, 64, 64), calib: bool = False,
                timeout: float = 1800.0, detail: bool = False) -> dict[str, Any]:
    """``dsrewrite apply MODEL.pt --arch SPEC`` (a state-dict file written here first) in a fresh interpreter,
    with the peak of each phase above the interpreter's baseline (imports done, nothing loaded)."""
    import tempfile

    import torch

    from dsrewrite.io import build_arch

    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        net = build_arch(_spec(model)).eval()  # random weights, never a download
        model_bytes = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
        torch.save(net.state_dict(), Path(d) / "model.pt")
        del net
        torch.save(torch.randn((8, *input_shape[1:]), generator=torch.Generator().manual_seed(0)), Path(d) / "calib.pt")
        (Path(d) / "meta.json").write_text(json.dumps({"model_bytes": model_bytes}))
        cmd = [sys.executable, os.path.abspath(__file__), "--cli-child", d, "--model", model, "--recipe", recipe,
               "--input-shape", ",".join(map(str, input_shape))] + (["--calib"] if calib else []) + (
                  ["--detail"] if detail else [])
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"dsrewrite apply failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _phase_table(rec: dict[str, Any]) -> str:
    head = ("| phase | peak − baseline (MiB) | in model sizes | at its end (MiB) | at its end (model sizes) |\n"
            "|---|---:|---:|---:|---:|")
    lines = [f"| {p['phase']} | {p['peak_mib']:.0f} | {p['peak_models']:.2f} | {p['end_mib']:.0f} | {p['end_models']:.2f} |"
             for p in rec["phases"]]
    lines.append(f"| **whole command** | **{rec['extra_mib']:.0f}** | **{rec['extra_model_copies']:.2f}** | | |")
    return "\n".join([head, *lines])


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
    ap.add_argument("--cli", action="store_true",
                    help="measure the whole `dsrewrite apply` command instead, phase by phase (a state-dict file "
                         "and --arch; with --calib, 8 calibration samples)")
    ap.add_argument("--calib", action="store_true", help="with --cli: pass --calib")
    ap.add_argument("--detail", action="store_true",
                    help="with --cli --calib: also the peaks of calibration's own steps (nested phases)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cli-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.input_shape.split(","))
    if args.child:
        print(json.dumps(_child(args.model, args.child, args.recipe, shape)))
        return 0
    if args.cli_child:
        print(json.dumps(_cli_child(args.model, args.recipe, shape, args.cli_child, args.calib, args.detail)))
        return 0
    if args.cli:
        rec = measure_cli(args.model, args.recipe, shape, calib=args.calib, detail=args.detail)
        print(f"`dsrewrite apply` on {rec['model']} ({rec['model_mib']} MiB of parameters and buffers), input "
              f"{rec['input_shape']}, recipe {rec['recipe']}{', --calib (8 samples)' if args.calib else ''}, "
              f"torch {rec['torch']}, baseline {rec['baseline_rss_mib']} MiB, {rec['seconds']:.1f} s\n")
        print(_phase_table(rec))
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
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
