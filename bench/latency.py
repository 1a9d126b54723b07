"""Latency of rewritten models against their originals, beside the MAC ratio. Not a test.

Models (random weights, nothing downloaded): smp ``Unet("resnet18")`` (the embedded
``dsrewrite.demo.demo_unet`` when smp is missing) with the recipes ``decoder_only`` and
``all_3x3``, and torchvision ``resnet18`` with ``all_3x3``. Backends:

* ``eager``     eager PyTorch, NCHW, the model as ``dsrewrite.rewrite`` returns it;
* ``eager_cl``  eager, channels_last copies of model and input, BN not folded;
* ``deploy``    the recommended form, ``dsrewrite.deploy.prepare_for_deployment``
                (eval, BN folded, pointwise stages hoisted above upsamples, channels_last),
                for the original and the rewritten model;
* ``ort``       ONNX Runtime (CPU execution provider), files from
                ``dsrewrite.deploy.export_onnx`` of the same form in NCHW (parity-checked);
* ``compile``   (only when asked for) ``torch.compile`` (inductor, weight freezing) of the
                ``deploy`` form; compiling takes minutes on 2 cores.

Every comparison is ``dsrewrite.measure.latency.compare_latency``: original and rewritten called
alternately, the reported ratio is the median of the per-round ratios rewritten/original
(< 1: the rewrite is faster); ``q1``/``q3`` are the quartiles of those ratios (the noise).
Extras on ``Unet decoder_only`` at the largest size: the per-layer order choice
``--order auto`` (pw_dw where it has fewer MACs), and allocator settings (glibc tunables,
jemalloc via LD_PRELOAD), each measured in a child process started with that environment.

Two diagnostics (CPU only): ``--layers`` times each swapped decoder conv of the Unet against
its dense original (ms and GMAC/s, NCHW and channels_last); ``--micro`` times a ReLU and a
depthwise conv on a 32 MiB activation under each allocator setting.

Reproduce (the commands behind the tables of docs/latency.md)::

    .venv/bin/python bench/latency.py --threads 1 --json /tmp/latency.json   # full run, ~10 min
    .venv/bin/python bench/latency.py --quick          # Unet decoder_only at 512² only, fewer rounds
    .venv/bin/python bench/latency.py --models unet --recipes decoder_only --sizes 512 --backends compile --allocators default --threads 1 --rounds 8
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824 \
        .venv/bin/python bench/latency.py --layers --sizes 512 --rounds 5 --threads 1
    .venv/bin/python bench/latency.py --micro --threads 1 --rounds 10
    .venv/bin/python bench/latency.py --device cuda    # on a GPU (ORT is then skipped unless --ort-cuda)
    .venv/bin/python bench/latency.py --runtimes eager,onnx,executorch --threads 1,2 --out docs/latency-runtimes.md
        # eager / ONNX Runtime / ExecuTorch XNNPACK, exported as `dsrewrite export` does (bench/runtimes.py)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

import dsrewrite.api as dsr
from dsrewrite.deploy import GLIBC_TUNABLES, export_onnx, fold_batchnorm, prepare_for_deployment
from dsrewrite.latency import compare_latency
from dsrewrite.macs import count_costs

__all__ = ["Config", "OrtModel", "ALLOCATORS", "run_configs", "main"]

#: jemalloc keeps freed pages only with purging off (its default purges blocks ≥ 8 MiB at once).
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
JEMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/tmp/jemalloc/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
)
ALLOCATORS = ("default", "tunables", "jemalloc")
MODELS = {"unet": ("decoder_only", "all_3x3"), "resnet18": ("all_3x3",)}
BACKENDS = ("eager", "eager_cl", "deploy", "ort")
#: Backends that run only when asked for with --backends (slow to prepare).
OPTIONAL_BACKENDS = ("compile",)


@dataclass(frozen=True)
class Config:
    model: str
    recipe: str
    order: str  # "recipe" (the recipe's order, dw_pw) or "auto"
    size: int
    backend: str
    allocator: str = "default"
    batch: int = 1


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------
def build_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "unet":
        try:
            import segmentation_models_pytorch as smp

            return smp.Unet("resnet18", encoder_weights=None).eval()
        except ImportError:
            from dsrewrite.demo import demo_unet

            return demo_unet().eval()
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(weights=None).eval()
    raise SystemExit(f"unknown model {name!r}; choose from {sorted(MODELS)}")


class OrtModel(nn.Module):
    """An ONNX Runtime session behind ``nn.Module.__call__`` so that ``compare_latency`` can time it."""

    def __init__(self, path: str, threads: int, device: str) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)


# --------------------------------------------------------------------------------------
# Running configurations
# --------------------------------------------------------------------------------------
class Cache:
    """Models, rewrites, MAC ratios and ONNX files, built once per process."""

    def __init__(self, tmpdir: str, device: str) -> None:
        self.tmpdir, self.device = tmpdir, device
        self._store: dict[Any, Any] = {}

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._store:
            self._store[key] = make()
        return self._store[key]

    def pair(self, model: str, recipe: str, order: str) -> tuple[nn.Module, nn.Module]:
        def make() -> tuple[nn.Module, nn.Module]:
            original = self.get(("model", model), lambda: build_model(model))
            x64 = torch.randn(1, 3, 64, 64)
            rewritten = dsr.rewrite(original, recipe, example_inputs=x64, order=None if order == "recipe" else order)
            return original, rewritten.eval()

        return self.get(("pair", model, recipe, order), make)

    def mac_ratio(self, model: str, recipe: str, order: str, size: int, *, deployed: bool = False) -> float:
        """Rewritten / original MACs; of the deployment forms with ``deployed`` (the hoist moves
        pointwise MACs to the low resolution)."""
        def make() -> float:
            a, b = (self.deployed if deployed else self.pair)(model, recipe, order)
            x = torch.randn(1, 3, size, size)
            if deployed:
                x = x.contiguous(memory_format=torch.channels_last)
            return count_costs(b, x).total_macs / count_costs(a, x).total_macs

        return self.get(("deploy_macs" if deployed else "macs", model, recipe, order, size), make)

    def deployed(self, model: str, recipe: str, order: str) -> tuple[nn.Module, nn.Module]:
        def make() -> tuple[nn.Module, nn.Module]:
            a, b = self.pair(model, recipe, order)
            x = torch.randn(1, 3, 64, 64)
            return prepare_for_deployment(a, x), prepare_for_deployment(b, x)

        return self.get(("deploy", model, recipe, order), make)

    def onnx(self, model: str, recipe: str, order: str, size: int, threads: int) -> tuple[nn.Module, nn.Module, float]:
        def make() -> tuple[nn.Module, nn.Module, float]:
            a, b = self.pair(model, recipe, order)
            x = torch.randn(1, 3, size, size)
            paths, diffs = [], []
            for tag, m in (("orig", a), ("rewr", b)):
                path = os.path.join(self.tmpdir, f"{model}-{recipe}-{order}-{size}-{tag}.onnx")
                if not os.path.exists(path):
                    diffs.append(export_onnx(prepare_for_deployment(m, x, channels_last=False), x, path).max_abs_diff)
                paths.append(path)
            ort_a, ort_b = (OrtModel(p, threads, self.device) for p in paths)
            return ort_a, ort_b, max(d for d in diffs if d is not None) if diffs else float("nan")

        return self.get(("onnx", model, recipe, order, size), make)


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def run_config(cfg: Config, cache: Cache, rounds: int, warmup: int, threads: int, device: str) -> dict[str, Any]:
    x = torch.randn(cfg.batch, 3, cfg.size, cfg.size, generator=torch.Generator().manual_seed(cfg.size))
    extra: dict[str, Any] = {}
    if cfg.backend in ("eager", "eager_cl"):
        a, b = cache.pair(cfg.model, cfg.recipe, cfg.order)
        res = compare_latency(a, b, x, rounds=rounds, warmup=warmup, channels_last=cfg.backend == "eager_cl", device=device)
    elif cfg.backend == "deploy":
        a, b = cache.deployed(cfg.model, cfg.recipe, cfg.order)
        res = compare_latency(a, b, x, rounds=rounds, warmup=warmup, channels_last=True, device=device)
    elif cfg.backend == "compile":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        da, db = (copy.deepcopy(m).to(device) for m in cache.deployed(cfg.model, cfg.recipe, cfg.order))
        a, b = torch.compile(da), torch.compile(db)
        xc = x.to(device).contiguous(memory_format=torch.channels_last)
        start = time.perf_counter()
        with torch.inference_mode():  # compile (and check) before timing
            for m, ref in ((a, da), (b, db)):
                got, want = m(xc), ref(xc)
                extra[f"compile_max_abs_diff_{'ab'[m is b]}"] = (got - want).abs().max().item()
        extra["compile_s"] = time.perf_counter() - start
        res = compare_latency(a, b, xc, rounds=rounds, warmup=warmup, device=device)
    else:  # ort: the session decides its own device; inputs are handed over on the CPU
        a, b, diff = cache.onnx(cfg.model, cfg.recipe, cfg.order, cfg.size, threads)
        res = compare_latency(a, b, x, rounds=rounds, warmup=warmup, device="cpu")
        extra = {"onnx_max_abs_diff": diff, "provider": a.provider}
    ratios = [tb / ta for ta, tb in zip(res.times_a_ms, res.times_b_ms)]
    q1, q3 = quartiles(ratios)
    extra["min_ratio"] = min(res.times_b_ms) / min(res.times_a_ms)
    return {
        **cfg.__dict__,
        # the MACs of the form timed: deploy/compile/ort run the prepare_for_deployment form
        "mac_ratio": cache.mac_ratio(cfg.model, cfg.recipe, cfg.order, cfg.size,
                                     deployed=cfg.backend in ("deploy", "compile", "ort")),
        "latency_ratio": res.ratio,
        "ratio_q1": q1,
        "ratio_q3": q3,
        "original_ms": res.median_a_ms,
        "rewritten_ms": res.median_b_ms,
        "rounds": res.rounds,
        "warmup": res.warmup,
        "device": res.device,
        **extra,
    }


def plan_configs(args: argparse.Namespace) -> list[Config]:
    configs = []
    for model in args.models:
        for recipe in MODELS[model]:
            if recipe not in args.recipes:
                continue
            for size in args.sizes:
                for backend in args.backends:
                    configs.append(Config(model, recipe, "recipe", size, backend, batch=args.batch))
    if args.extras and "unet" in args.models and "decoder_only" in args.recipes:
        size = max(args.sizes)
        configs += [Config("unet", "decoder_only", "auto", size, b, batch=args.batch)
                    for b in args.backends if b != "eager"]
    if args.device == "cuda":
        configs = [c for c in configs if c.backend != "ort" or args.ort_cuda]
    return configs


def run_configs(configs: list[Config], args: argparse.Namespace, allocator: str = "default") -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsrewrite-bench-") as tmp:
        cache = Cache(tmp, args.device)
        for cfg in configs:
            cfg = Config(**{**cfg.__dict__, "allocator": allocator})
            start = time.perf_counter()
            row = run_config(cfg, cache, args.rounds, args.warmup, args.threads, args.device)
            row["wall_s"] = time.perf_counter() - start
            rows.append(row)
            print(format_row(row), file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------------------
# Per-layer breakdown: where the time of the decoder goes, and at what MAC rate
# --------------------------------------------------------------------------------------
def time_modules(model: nn.Module, names: list[str], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Least wall time (ms) of each named module's forward over ``rounds`` calls of the model (CPU).

    The minimum, not the median: on a shared machine it is the time least disturbed by other processes.
    """
    samples: dict[str, list[float]] = {n: [] for n in names}
    starts: dict[str, float] = {}
    handles = []
    for n in names:
        mod = model.get_submodule(n)
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=n: starts.__setitem__(n, time.perf_counter())))
        handles.append(mod.register_forward_hook(
            lambda m, a, o, n=n: samples[n].append((time.perf_counter() - starts[n]) * 1e3)))
    try:
        with torch.inference_mode():
            for _ in range(rounds + 1):
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: min(v[1:]) for n, v in samples.items()}


def layer_breakdown(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Decoder convs of Unet decoder_only: dense vs depthwise vs pointwise time and GMAC/s, per memory format."""
    torch.set_num_threads(args.threads)
    size = max(args.sizes)
    x = torch.randn(1, 3, size, size)
    cache = Cache(tempfile.gettempdir(), args.device)
    a, b = cache.pair("unet", "decoder_only", "recipe")
    fa, fb = fold_batchnorm(a), fold_batchnorm(b)
    macs_a, macs_b = count_costs(a, x).modules, count_costs(b, x).modules
    dense = [n for n, m in a.named_modules() if n in macs_a and type(b.get_submodule(n)).__name__ == "DepthwiseSeparableConv2d"]
    stages = [f"{n}.{s}" for n in dense for s in ("depthwise", "pointwise")]
    rows = []
    for fmt in ("nchw", "channels_last"):
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        ma, mb = fa.to(memory_format=mf), fb.to(memory_format=mf)
        xi = x.contiguous(memory_format=mf)
        ta, tb = time_modules(ma, dense, xi, args.rounds), time_modules(mb, stages, xi, args.rounds)
        for n in dense:
            dw, pw = f"{n}.depthwise", f"{n}.pointwise"
            rows.append({
                "format": fmt, "layer": n, "shape": macs_a[n].input_shape,
                "dense_ms": ta[n], "dense_gmacs": macs_a[n].macs / ta[n] / 1e6,
                "dw_ms": tb[dw], "dw_gmacs": macs_b[dw].macs / tb[dw] / 1e6,
                "pw_ms": tb[pw], "pw_gmacs": macs_b[pw].macs / tb[pw] / 1e6,
                "ratio": (tb[dw] + tb[pw]) / ta[n], "mac_ratio": (macs_b[dw].macs + macs_b[pw].macs) / macs_a[n].macs,
            })
    print("| format | layer | input | dense ms (GMAC/s) | depthwise ms (GMAC/s) | pointwise ms (GMAC/s) "
          "| layer latency ratio | MAC ratio |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['layer']} | {'×'.join(map(str, r['shape'][1:]))} "
              f"| {r['dense_ms']:.1f} ({r['dense_gmacs']:.0f}) | {r['dw_ms']:.1f} ({r['dw_gmacs']:.0f}) "
              f"| {r['pw_ms']:.1f} ({r['pw_gmacs']:.0f}) | {r['ratio']:.2f} | {r['mac_ratio']:.3f} |")
    return rows


# --------------------------------------------------------------------------------------
# Allocator micro-benchmark: one memory-bound op on a 32 MiB activation
# --------------------------------------------------------------------------------------
def micro(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Least time of ReLU and of a depthwise 3×3 over a 32×512×512 (32 MiB) and a 16×512×512
    channels_last fp32 tensor, under this process's allocator (``--as-allocator`` names it)."""
    torch.set_num_threads(args.threads)
    if args.as_allocator == "mallopt":
        from dsrewrite.deploy import tune_glibc_malloc

        tune_glibc_malloc()
    rows = []
    with torch.inference_mode():
        for c in (32, 16):
            x = torch.randn(1, c, 512, 512).contiguous(memory_format=torch.channels_last)
            w = torch.randn(c, 1, 3, 3).contiguous(memory_format=torch.channels_last)
            for op, f in (("relu", torch.relu), ("depthwise", lambda t: torch.nn.functional.conv2d(t, w, padding=1, groups=c))):
                times = []
                for _ in range(args.rounds + 1):
                    start = time.perf_counter()
                    f(x)
                    times.append((time.perf_counter() - start) * 1e3)
                rows.append({"allocator": args.as_allocator, "channels": c, "op": op, "min_ms": min(times[1:])})
    return rows


def run_micro(args: argparse.Namespace) -> None:
    rows = []
    for name in ["default", "mallopt"] + [a for a in args.allocators if a != "default"]:
        env = allocator_env("default" if name == "mallopt" else name, args.jemalloc)
        if env is None:
            print(f"[bench] allocator {name!r}: no library found; skipped", file=sys.stderr)
            continue
        variants = [(name, env)]
        if name == "jemalloc":  # also jemalloc's own defaults, which do not help
            plain = dict(env)
            plain.pop("MALLOC_CONF")
            variants.insert(0, ("jemalloc-default-conf", plain))
        for label, e in variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--micro-child", "--as-allocator", label,
                   "--threads", str(args.threads), "--rounds", str(args.rounds)]
            done = subprocess.run(cmd, env=e, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"micro-benchmark child {label!r} failed:\n{done.stderr[-3000:]}")
            rows += json.loads(done.stdout)
    print("| allocator | channels | ReLU ms | depthwise 3×3 ms |\n|---|---|---|---|")
    for label in dict.fromkeys(r["allocator"] for r in rows):
        for c in (32, 16):
            t = {r["op"]: r["min_ms"] for r in rows if r["allocator"] == label and r["channels"] == c}
            print(f"| {label} | {c}×512×512 | {t['relu']:.1f} | {t['depthwise']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(args), "micro": rows}, f, indent=2)


# --------------------------------------------------------------------------------------
# Allocator settings, each in a child process started with its environment
# --------------------------------------------------------------------------------------
def allocator_env(name: str, jemalloc: Optional[str]) -> Optional[dict[str, str]]:
    env = dict(os.environ)
    if name == "tunables":
        env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
        return env
    if name == "jemalloc":
        lib = jemalloc or next((p for p in JEMALLOC_CANDIDATES if os.path.exists(p)), None)
        if lib is None or not os.path.exists(lib):
            return None
        env["LD_PRELOAD"] = lib
        env["MALLOC_CONF"] = JEMALLOC_CONF
        return env
    return env


def run_allocator_child(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    env = allocator_env(name, args.jemalloc)
    if env is None:
        print(f"[bench] allocator {name!r}: no library found (tried {JEMALLOC_CANDIDATES}); skipped", file=sys.stderr)
        return []
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [
        sys.executable, os.path.abspath(__file__), "--models", "unet", "--recipes", "decoder_only",
        "--sizes", str(max(args.sizes)), "--backends", "eager,deploy", "--allocators", "default",
        "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--threads", str(args.threads),
        "--device", args.device, "--json", out, "--as-allocator", name,
    ]
    try:
        subprocess.run(cmd, env=env, check=True)
        with open(out) as f:
            return json.load(f)["rows"]
    finally:
        os.unlink(out)


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------
HEADER = (
    "| model | recipe | order | size | backend | allocator | MAC ratio | latency ratio [q1, q3] | min ratio "
    "| original ms | rewritten ms |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def _shape(r: dict[str, Any]) -> str:
    batch = r.get("batch", 1)
    return f"{r['size']}²" if batch == 1 else f"{batch}×{r['size']}²"


def format_row(r: dict[str, Any]) -> str:
    return (
        f"| {r['model']} | {r['recipe']} | {r['order']} | {_shape(r)} | {r['backend']} | {r['allocator']} "
        f"| {r['mac_ratio']:.3f} | **{r['latency_ratio']:.3f}** [{r['ratio_q1']:.2f}, {r['ratio_q3']:.2f}] "
        f"| {r['min_ratio']:.3f} | {r['original_ms']:.1f} | {r['rewritten_ms']:.1f} |"
    )


def environment(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "glibc_tunables": GLIBC_TUNABLES,
        "jemalloc_conf": JEMALLOC_CONF,
    }


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    csv = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    p.add_argument("--models", type=csv, default=list(MODELS), help="comma list of: " + ",".join(MODELS))
    p.add_argument("--recipes", type=csv, default=["decoder_only", "all_3x3"])
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[256, 512])
    p.add_argument("--backends", type=csv, default=list(BACKENDS),
                   help="comma list of: " + ",".join(BACKENDS + OPTIONAL_BACKENDS) + " (compile only when named)")
    p.add_argument("--allocators", type=csv, default=list(ALLOCATORS), help="comma list of: " + ",".join(ALLOCATORS))
    p.add_argument("--jemalloc", default=None, help="path of libjemalloc.so.2 (default: the usual system paths)")
    p.add_argument("--no-extras", dest="extras", action="store_false", help="skip the --order auto configurations")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch", type=int, default=1, help="batch size of the timed input (default 1)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--ort-cuda", action="store_true", help="with --device cuda: also time ORT (needs its CUDA EP)")
    p.add_argument("--quick", action="store_true", help="Unet decoder_only at the largest size only, 6 rounds")
    p.add_argument("--json", default=None, help="write the rows and the environment here")
    p.add_argument("--layers", action="store_true", help="only the per-layer breakdown of Unet decoder_only")
    p.add_argument("--micro", action="store_true", help="only the allocator micro-benchmark (ReLU, depthwise on 32 MiB)")
    p.add_argument("--micro-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--as-allocator", default="default", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, options in (("models", MODELS), ("backends", BACKENDS + OPTIONAL_BACKENDS), ("allocators", ALLOCATORS)):
        bad = [v for v in getattr(args, name) if v not in options]
        if bad:
            p.error(f"--{name}: unknown {bad}; choose from {list(options)}")
    if args.device == "cuda" and (args.layers or args.micro):
        p.error("--layers and --micro time CPU code without device synchronisation: run them with --device cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    if args.quick:
        args.models, args.recipes, args.sizes = ["unet"], ["decoder_only"], [max(args.sizes)]
        args.rounds, args.warmup = min(args.rounds, 6), min(args.warmup, 2)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--runtimes" or a.startswith("--runtimes=") for a in argv):  # the runtime table: bench/runtimes.py
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from runtimes import main as runtimes_main

        return runtimes_main(argv)
    args = parse_args(argv)
    if args.micro_child:
        print(json.dumps(micro(args)))
        return 0
    if args.micro:
        run_micro(args)
        return 0
    if args.layers:
        rows = layer_breakdown(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": environment(args), "layers": rows}, f, indent=2)
        return 0
    start = time.perf_counter()
    load_before = os.getloadavg()
    rows = run_configs(plan_configs(args), args, allocator=args.as_allocator)
    if args.as_allocator == "default" and "unet" in args.models and "decoder_only" in args.recipes:
        for name in args.allocators:
            if name != "default":
                rows += run_allocator_child(name, args)
    result = {
        "environment": environment(args),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "wall_s": time.perf_counter() - start,
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.as_allocator == "default":
        print(HEADER)
        for r in rows:
            print(format_row(r))
        print(f"\n{json.dumps(result['environment'])}\nload average before {load_before}, after "
              f"{result['loadavg_after']}; wall {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
