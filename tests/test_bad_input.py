"""Every bad input fails cleanly and loses nothing; every odd-but-valid model works.

Failure cases are tables. Each row: one clear message line, exit 2 in the CLI, a
typed :class:`~dsrewrite.errors.DsRewriteError` in the API, nothing written (the
directory listing is compared before and after) and the user's model untouched
(state dict equal, same classes). Cases already covered elsewhere are listed in
docs/robustness.md with the test that covers them and are not repeated here.
"""

from __future__ import annotations

import copy
import errno
import io
import os
import shlex
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import dsrewrite
from dsrewrite.apply import apply_plan
from dsrewrite.errors import UnsupportedModelError
from cli_checks import assert_clean_cli_error, run_cli
from dsrewrite.cli import main
from dsrewrite.errors import DsRewriteError, InputShapeError, PlanError, UsageError
from dsrewrite.io import load_model, plan_path_for
from dsrewrite.plan_types import LayerConfig, Plan, PlanEntry
from dsrewrite.planner import NothingSelectedWarning, plan

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization is deprecated
    import torch.ao.nn.quantized.dynamic as nnqd
    import torch.ao.quantization as tq

SHAPE = (1, 3, 16, 16)
SHAPE_ARG = "1,3,16,16"


# ----------------------------------------------------------------------------- helpers


def small_net(seed: int = 0, **conv_kw: Any) -> nn.Sequential:
    """Stem (3→16, kept dense by all_3x3) and two 16→16 3×3 convs."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, **conv_kw), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, **conv_kw),
    ).eval()


def x_in(shape: tuple[int, ...] = SHAPE, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def listing(d: Path) -> list[str]:
    """Every path under ``d`` (hidden temp files included), relative."""
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, type], bool]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return sd, {n: type(m) for n, m in model.named_modules()}, model.training


def assert_untouched(model: nn.Module, snap: tuple[dict[str, torch.Tensor], dict[str, type], bool]) -> None:
    sd, classes, training = snap
    now = model.state_dict()
    assert list(now) == list(sd), "the model's state-dict keys changed"
    for k, v in sd.items():
        if v.device.type != "meta":
            assert torch.equal(now[k], v), f"{k} changed: max abs diff {(now[k] - v).abs().max().item():.3e}"
    assert {n: type(m) for n, m in model.named_modules()} == classes, "the model's modules changed"
    assert model.training == training


def quantized_static(seed: int = 0) -> nn.Module:
    """A statically quantized (int8 packed) conv net: QuantStub → QuantizedConv2d ×2 → DeQuantStub."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = nn.Sequential(tq.QuantStub(), *small_net(seed)[2:], tq.DeQuantStub()).eval()
        net.qconfig = tq.get_default_qconfig("x86")
        prepared = tq.prepare(net)
        prepared(x_in((4, 16, 16, 16), seed=5))  # calibrate the observers
        return tq.convert(prepared)


def quantized_dynamic_conv(seed: int = 0) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tq.quantize_dynamic(small_net(seed), {nn.Conv2d: tq.default_dynamic_qconfig},
                                   mapping={nn.Conv2d: nnqd.Conv2d})


def meta_net() -> nn.Module:
    with torch.device("meta"):
        return small_net()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


# ----------------------------------------------------------------------------- CLI table


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Input files, in their own folder (never the folder a case writes to)."""
    d = tmp_path_factory.mktemp("inputs")
    out: dict[str, Path] = {"dir": d}
    out["net"] = d / "net.pt"
    torch.save(small_net(), out["net"])
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18(weights=None)
    out["r18_sd"] = d / "r18_sd.pt"
    torch.save(r18.state_dict(), out["r18_sd"])
    full = d / "r18_full.pt"
    torch.save(r18, full)
    data = full.read_bytes()
    out["truncated"] = d / "truncated.pt"
    out["truncated"].write_bytes(data[: len(data) // 3])
    full.unlink()
    out["quant"] = d / "quant.pt"
    torch.save(quantized_static(), out["quant"])
    out["meta"] = d / "meta.pt"
    torch.save(meta_net(), out["meta"])
    recipes = {
        "malformed": "name: x\nselect:\n  kernel_size: [3x3\n",
        "wrong_type": "name: x\nselect:\n  in_channels: lots\n",
        "out_of_range": "name: x\nreplace:\n  depth_multiplier: 0\n",
    }
    for name, text in recipes.items():
        out[name] = d / f"{name}.yaml"
        out[name].write_text(text, encoding="utf-8")
    out["marker"] = d / "pwned"
    out["tag"] = d / "tag.yaml"
    out["tag"].write_text(f"name: !!python/object/apply:os.system ['touch {out['marker']}']\n", encoding="utf-8")
    out["pickle_payload"] = d / "payload.pt"
    torch.save({"model": _Payload(out["marker"])}, out["pickle_payload"])
    return out


# (label, argv after `apply`, message fragments). {in:NAME} is an input file, {out} the output folder.
CLI_CASES: list[tuple[str, list[str], tuple[str, ...]]] = [
    ("truncated file", ["{in:truncated}", "--recipe", "all_3x3"], ("truncated or corrupt", "truncated.pt")),
    ("state dict without --arch", ["{in:r18_sd}", "--recipe", "all_3x3"], ("state dict", "--arch")),
    ("--arch does not match", ["{in:r18_sd}", "--arch", "torchvision:resnet34", "--recipe", "all_3x3"],
     ("does not fit arch 'torchvision:resnet34'", "missing")),
    ("malformed recipe YAML", ["{in:net}", "--recipe", "{in:malformed}"], ("malformed.yaml", "not valid YAML")),
    ("recipe with a python tag", ["{in:net}", "--recipe", "{in:tag}"], ("tag.yaml", "not allowed")),
    ("recipe value of the wrong type", ["{in:net}", "--recipe", "{in:wrong_type}"],
     ("select.in_channels", "'lots'")),
    ("recipe value out of range", ["{in:net}", "--recipe", "{in:out_of_range}"],
     ("replace.depth_multiplier", "≥ 1")),
    ("statically quantized model file", ["{in:quant}", "--recipe", "all_3x3"],
     ("quantized module", "float model before quantizing")),
    ("quantized model file, --trust-pickle", ["{in:quant}", "--recipe", "all_3x3", "--trust-pickle"],
     ("could not be rebuilt", "quantized modules", "state dict and pass --arch")),
    ("quantized model from a factory", [f"{__name__}:quantized_static", "--recipe", "all_3x3"],
     ("quantized conv", "'1'", "float model before quantizing")),
    ("model on the meta device", ["{in:meta}", "--recipe", "all_3x3"], ("meta device", "load the weights")),
    ("pickle with a code payload", ["{in:pickle_payload}", "--recipe", "all_3x3"], ("refused to load global", "system", "--trust-pickle")),
    ("unwritable output directory", ["{in:net}", "--recipe", "all_3x3", "-o", "{ro}/light.pt"], ("not writable",)),
]


@pytest.mark.parametrize("label,argv,fragments", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_cleanly_and_writes_nothing(inputs: dict[str, Path], tmp_path: Path, label: str,
                                                argv: list[str], fragments: tuple[str, ...],
                                                unwritable_dir: Callable[[], Path]) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ro = unwritable_dir() if "{ro}" in " ".join(argv) else None
    args = []
    for a in argv:
        for key, path in inputs.items():
            a = a.replace(f"{{in:{key}}}", str(path))
        args.append(a.replace("{ro}", str(ro)))
    if "-o" not in args:
        args += ["-o", str(out_dir / "light.pt")]
    args += ["--input-shape", SHAPE_ARG, "--report", str(out_dir / "r.json")]
    inputs_before = {p: p.read_bytes() for p in inputs["dir"].iterdir() if p.is_file()}
    before_ro = listing(ro) if ro is not None and ro != Path("/sys") else None
    r = run_cli(["apply", *args])
    assert_clean_cli_error(label, r, fragments)
    assert listing(out_dir) == [], f"{label}: wrote {listing(out_dir)}"
    if before_ro is not None:
        assert listing(ro) == before_ro
    for p, data in inputs_before.items():
        assert p.read_bytes() == data, f"{label}: input {p.name} changed"
    assert not inputs["marker"].exists(), f"{label}: a payload ran"


# ----------------------------------------------------------------------------- API table

# (label, model factory, call(model) -> Any, exception class, message fragments)
API_CASES: list[tuple[str, Callable[[], nn.Module], Callable[[nn.Module], Any], type, tuple[str, ...]]] = [
    ("input shape the model cannot run", small_net,
     lambda m: dsrewrite.rewrite(m, "all_3x3", example_inputs=x_in((1, 5, 16, 16))),
     InputShapeError, ("cannot run on the example input", "[(1, 5, 16, 16)]", "channels")),
    ("statically quantized convs", quantized_static,
     lambda m: dsrewrite.rewrite(m, "all_3x3", example_inputs=x_in((1, 16, 16, 16))),
     UnsupportedModelError, ("quantized conv", "'1'", "float model before quantizing")),
    ("dynamically quantized convs", quantized_dynamic_conv,
     lambda m: dsrewrite.rewrite(m, "all_3x3", example_inputs=x_in()),
     UnsupportedModelError, ("quantized conv", "dynamic", "float model before quantizing")),
    ("quantized convs through apply_plan", quantized_dynamic_conv,
     lambda m: apply_plan(m, Plan((PlanEntry("2", "replace", "t", LayerConfig()),), "t", "fx")),
     UnsupportedModelError, ("quantized conv",)),
    ("meta device, svd", meta_net,
     lambda m: dsrewrite.rewrite(m, "all_3x3", input_shape=SHAPE),
     UnsupportedModelError, ("meta device", "'0.weight'", "Load the weights", "init='random'")),
    ("meta device, random init (rewrite)", meta_net,
     lambda m: dsrewrite.rewrite_and_report(m, "all_3x3", input_shape=SHAPE, init="random"),
     UnsupportedModelError, ("meta device",)),
    ("meta device, apply_plan with svd", meta_net,
     lambda m: apply_plan(m, Plan((PlanEntry("2", "replace", "t", LayerConfig()),), "t", "fx")),
     UnsupportedModelError, ("'2'", "meta device", "init='random'")),
    ("plan naming a depthwise Conv1d", lambda: nn.Sequential(nn.Conv1d(16, 16, 3, groups=16)),
     lambda m: apply_plan(m, Plan((PlanEntry("0", "replace", "t", LayerConfig()),), "t", "fx")),
     PlanError, ("'0'", "depthwise", "already separable")),
    ("DistributedDataParallel in place", lambda: _ddp(small_net()),
     lambda m: dsrewrite.rewrite(m, "all_3x3", example_inputs=x_in(), inplace=True),
     UnsupportedModelError, ("DistributedDataParallel in place", "model.module")),
]


@pytest.fixture(scope="module")
def process_group(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A one-process gloo group, so DistributedDataParallel can be built on the CPU."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{store}")
    yield dist
    dist.destroy_process_group()


def _ddp(model: nn.Module) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model)


@pytest.mark.parametrize("label,factory,call,exc,fragments", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_refuses_with_typed_error_and_leaves_model_untouched(
        request: pytest.FixtureRequest, label: str, factory: Callable[[], nn.Module],
        call: Callable[[nn.Module], Any], exc: type, fragments: tuple[str, ...]) -> None:
    if "DistributedDataParallel" in label:
        request.getfixturevalue("process_group")
    model = factory()
    snap = snapshot(model)
    with pytest.raises(exc) as info:
        call(model)
    assert isinstance(info.value, DsRewriteError)
    msg = str(info.value)
    assert "\n" not in msg, f"{label}: multi-line message {msg!r}"
    for frag in fragments:
        assert frag in msg, f"{label}: {frag!r} not in {msg!r}"
    assert_untouched(model, snap)


def test_usage_errors_are_usage_errors() -> None:
    """Bad models are the user's input: the CLI maps them to exit 2."""
    assert issubclass(UnsupportedModelError, UsageError)


# ----------------------------------------------------------------------------- models that must work


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def test_data_parallel_is_looked_through() -> None:
    model = small_net()
    dp = nn.DataParallel(model)
    snap = snapshot(dp)
    res = dsrewrite.rewrite_and_report(dp, "all_3x3", example_inputs=x_in(), depth_multiplier=9)
    assert [e.name for e in res.plan.replaced] == ["2", "4"], "plan names must not carry 'module.'"
    assert type(res.model) is nn.DataParallel and type(res.model.module) is nn.Sequential
    assert type(res.model.module[2]).__name__ == "DepthwiseSeparableConv2d"
    assert_untouched(dp, snap)
    with torch.no_grad():
        err = _max_err(res.model(x_in()), dp(x_in()))
    assert err < 1e-5, f"DataParallel rewrite at m=9 differs: max abs error {err:.3e}"
    # the plan re-applies to a fresh, unwrapped instance of the architecture
    fresh = apply_plan(small_net(seed=3), res.plan)
    assert type(fresh[4]).__name__ == "DepthwiseSeparableConv2d"
    # a plan made on the wrapper itself ('module.' names) is carried out on the inner model
    # plan() looks through the wrapper too
    assert [e.name for e in plan(dp, "all_3x3", x_in()).replaced] == ["2", "4"]
    # a plan made by hand on the wrapper ('module.' names) is carried out on the inner model
    from dataclasses import replace as _dc_replace

    base = plan(model, "all_3x3", x_in())
    wrapped_plan = _dc_replace(base, entries=tuple(_dc_replace(e, name="module." + e.name) for e in base.entries))
    res2 = dsrewrite.rewrite_with_plan(dp, wrapped_plan, x_in(), with_report=False)
    assert [e.name for e in res2.plan.replaced] == ["2", "4"]
    # in place: the wrapper comes back, its inner model rewritten
    dp2 = nn.DataParallel(small_net())
    out = dsrewrite.rewrite(dp2, "all_3x3", example_inputs=x_in(), inplace=True)
    assert out is dp2 and type(dp2.module[2]).__name__ == "DepthwiseSeparableConv2d"


def test_distributed_data_parallel_comes_back_unwrapped(process_group: Any) -> None:
    ddp = _ddp(small_net())
    snap = snapshot(ddp)
    res = dsrewrite.rewrite_and_report(ddp, "all_3x3", example_inputs=x_in(), depth_multiplier=9)
    assert [e.name for e in res.plan.replaced] == ["2", "4"]
    assert type(res.model) is nn.Sequential, "DDP binds to its parameters: the result comes back unwrapped"
    assert_untouched(ddp, snap)
    with torch.no_grad():
        err = _max_err(res.model(x_in()), ddp.module(x_in()))
    assert err < 1e-5, f"DDP rewrite at m=9 differs: max abs error {err:.3e}"


# rel L2 error vs a float64 reference of the same (rounded) weights, at m = 9 (exact in exact arithmetic)
DTYPE_TOL = {torch.float32: 4 * torch.finfo(torch.float32).eps * 8,
             torch.float16: 4 * torch.finfo(torch.float16).eps,
             torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps}


@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
def test_half_precision_weights_work_at_full_rank(dtype: torch.dtype) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 16, 3, padding=1, stride=2),
    ).to(dtype).eval()
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.copy_(torch.randn_like(p, dtype=torch.float32).mul(0.2).to(dtype))
    ref = copy.deepcopy(model).double()  # the same rounded weights, float64 arithmetic
    snap = snapshot(model)
    x = x_in((2, 3, 16, 16), dtype)
    light = dsrewrite.rewrite(model, "all_3x3", example_inputs=x, depth_multiplier=9)
    assert_untouched(model, snap)
    assert all(p.dtype == dtype for p in light.parameters())
    with torch.no_grad():
        y_ref = ref(x.double())
        y = light(x).double()
        y1 = dsrewrite.rewrite(model, "all_3x3", example_inputs=x)(x).double()  # m=1: must move
    rel = ((y - y_ref).norm() / y_ref.norm()).item()
    rel1 = ((y1 - y_ref).norm() / y_ref.norm()).item()
    assert rel <= DTYPE_TOL[dtype], f"{dtype} at m=9: rel L2 {rel:.3e} > {DTYPE_TOL[dtype]:.3e} (max abs " \
                                    f"{_max_err(y, y_ref):.3e})"
    assert rel1 > 10 * DTYPE_TOL[dtype], f"m=1 should not match (rel L2 {rel1:.3e}): the test could not fail"


class SharedAlias(nn.Module):
    """One conv registered under two names and called at both sites."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = self.a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(self.stem(x))))


class SharedTwice(nn.Module):
    """One conv called twice in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.r = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.r(torch.relu(self.r(y))) + y


@pytest.mark.parametrize("cls", [SharedAlias, SharedTwice], ids=lambda c: c.__name__)
def test_shared_conv_is_replaced_once_and_both_sites_use_it(cls: type) -> None:
    torch.manual_seed(0)
    model = cls().double().eval()
    snap = snapshot(model)
    x = x_in(dtype=torch.float64)
    res = dsrewrite.rewrite_with_plan(model, plan(model, "all_3x3", x, depth_multiplier=9), x, with_report=False)
    assert len(res.plan.replaced) == 1
    new = res.model.get_submodule(res.plan.replaced[0].name)
    assert type(new).__name__ == "DepthwiseSeparableConv2d"
    if cls is SharedAlias:
        assert res.model.a is res.model.b, "the alias must point at the same new block"
    calls = []
    new.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        err = _max_err(res.model(x), model(x))
    assert len(calls) == 2, f"the new block ran {len(calls)} times, expected at both call sites"
    assert err < 1e-10, f"shared conv at m=9 differs: max abs error {err:.3e}"
    assert sum(1 for m in res.model.modules() if type(m).__name__ == "DepthwiseSeparableConv2d") == 1
    assert_untouched(model, snap)


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_padding_modes_are_exact_at_full_rank(mode: str) -> None:
    model = small_net(padding_mode=mode).double()
    x = x_in(dtype=torch.float64)
    light = dsrewrite.rewrite(model, "all_3x3", example_inputs=x, depth_multiplier=9)
    assert light[2].padding_mode == mode and light[2].depthwise.padding_mode == mode
    with torch.no_grad():
        err = _max_err(light(x), model(x))
    assert err < 1e-10, f"padding_mode={mode} at m=9: max abs error {err:.3e}"


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.point = nn.Conv2d(16, 16, 1)
        self.up = nn.ConvTranspose2d(16, 16, 3, padding=1)
        self.dense = nn.Conv2d(16, 16, 3, padding=1)
        self.c1 = nn.Conv1d(16, 16, 3, padding=1)
        self.c3 = nn.Conv3d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(self.up(self.point(self.grouped(self.stem(x)))))
        y = y + self.c1(y.flatten(2)).view_as(y)
        return y + self.c3(y.unsqueeze(2)).squeeze(2)


def test_unsupported_convs_are_skipped_with_reasons() -> None:
    model = Zoo().eval()
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NothingSelectedWarning)
        res = dsrewrite.rewrite_with_plan(model, plan(model, "all_3x3", x_in()), x_in(), with_report=False)
    assert [e.name for e in res.plan.replaced] == ["dense"]
    reasons = {e.name: e.reason for e in res.plan.entries if e.action == "skip"}
    expected = {
        "grouped": ("grouped", "groups=4", "select.groups [1]"),
        "point": ("1×1", "already pointwise"),
        "up": ("ConvTranspose2d", "transposed"),
        "c1": ("3 not in select.kernel_size [3×3]",),  # all_3x3 is 2-d; all_3x3x3 is its 3-d sibling
        "c3": ("3×3×3 not in select.kernel_size [3×3]",),
    }
    for name, frags in expected.items():
        for frag in frags:
            assert frag in reasons[name], f"{name}: {frag!r} not in reason {reasons[name]!r}"
    for name in expected:
        assert type(res.model.get_submodule(name)) is type(model.get_submodule(name))
    assert_untouched(model, snap)


def test_dynamically_quantized_linear_is_left_alone() -> None:
    """Quantized non-conv layers do not block the rewrite of the float convs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = nn.Sequential(*small_net(), nn.Flatten(), nn.Linear(16 * 16 * 16, 4)).eval()
        model = tq.quantize_dynamic(base, {nn.Linear}, dtype=torch.qint8)
    light = dsrewrite.rewrite(model, "all_3x3", example_inputs=x_in(), depth_multiplier=9)
    assert type(light[4]).__name__ == "DepthwiseSeparableConv2d"
    assert type(light[6]) is type(model[6])
    with torch.no_grad():
        before, after = light[:5](x_in()), model[:5](x_in())
    err = _max_err(after, before)
    assert err < 1e-5, f"float part at m=9 differs: max abs error {err:.3e}"


def test_meta_model_structure_only_rewrite_with_random_init() -> None:
    """The documented way to rewrite on the meta device: apply_plan(init='random'), no values."""
    p = plan(small_net(), "all_3x3", x_in())
    skeleton = apply_plan(meta_net(), p, init="random")
    assert type(skeleton[2]).__name__ == "DepthwiseSeparableConv2d"
    assert all(t.device.type == "meta" for t in skeleton.parameters())


def test_nothing_selected_on_unsupported_only_model_warns_in_api_and_exits_2_in_cli(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv1d(16, 16, 3)).eval()
    with pytest.warns(NothingSelectedWarning, match="selects no conv"):
        dsrewrite.rewrite(model, "all_3x3", example_inputs=torch.randn(1, 16, 10))
    path = tmp_path / "c1.pt"
    torch.save(model, path)
    r = run_cli(["apply", path, "--recipe", "all_3x3", "--input-shape", "1,16,10", "-o", tmp_path / "o.pt"])
    assert_clean_cli_error("conv1d only", r, ("selects no conv",))
    assert listing(tmp_path) == ["c1.pt"]


# ----------------------------------------------------------------------------- outputs: disk full, rollback


@pytest.fixture()
def out_dir(tmp_path: Path) -> Path:
    """A folder holding the input and an earlier rewrite at the output path (overwritten with --force)."""
    torch.save(small_net(), tmp_path / "net.pt")
    (tmp_path / "light.pt").write_bytes(b"earlier weights")
    (tmp_path / "light.plan.json").write_bytes(b"earlier plan")
    return tmp_path


def _apply_force(d: Path, *extra: str) -> Any:
    return run_cli(["apply", d / "net.pt", "--recipe", "all_3x3", "--input-shape", SHAPE_ARG,
                    "-o", d / "light.pt", "--force", *extra])


def _assert_earlier_outputs_kept(d: Path, before: list[str]) -> None:
    assert listing(d) == before, f"left behind: {sorted(set(listing(d)) - set(before))}"
    assert (d / "light.pt").read_bytes() == b"earlier weights"
    assert (d / "light.plan.json").read_bytes() == b"earlier plan"


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_the_model(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save
    wrote: list[int] = []

    def half_then_full(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        if not hasattr(f, "fileno"):  # only the output file write fails
            return real_save(obj, f, *a, **k)
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        wrote.append(len(data) // 2)
        raise _enospc()

    before = listing(out_dir)
    monkeypatch.setattr(torch, "save", half_then_full)
    r = _apply_force(out_dir, "--report", str(out_dir / "r.json"))
    assert wrote and wrote[0] > 0, "the fake write wrote nothing: a partial file could not have been detected"
    assert_clean_cli_error("disk full (model)", r, ("could not write", "light.pt", "No space left"))
    _assert_earlier_outputs_kept(out_dir, before)  # and no report either: the model goes first


def test_disk_full_while_saving_the_plan_after_the_model(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    calls: list[int] = []

    def second_fsync_fails(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the plan's temp file, after the model's was written and synced
            raise _enospc()
        real_fsync(fd)

    before = listing(out_dir)
    monkeypatch.setattr(os, "fsync", second_fsync_fails)
    r = _apply_force(out_dir)
    assert len(calls) >= 2
    assert_clean_cli_error("disk full (plan)", r, ("could not write", "light.plan.json", "No space left"))
    _assert_earlier_outputs_kept(out_dir, before)


def _fail_second_replace(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the second ``os.replace`` of the run fail with EIO; returns the destinations seen."""
    real_replace = os.replace
    calls: list[str] = []

    def second_replace_fails(src: Any, dst: Any) -> None:
        calls.append(str(dst))
        if len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_replace_fails)
    return calls


def test_failure_between_the_two_renames_rolls_back(out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = listing(out_dir)
    calls = _fail_second_replace(monkeypatch)
    r = _apply_force(out_dir)
    assert len(calls) >= 2 and calls[1].endswith("light.plan.json")
    assert_clean_cli_error("rename failed", r, ("could not write", "light.plan.json"))
    _assert_earlier_outputs_kept(out_dir, before)


def test_failure_between_the_renames_removes_new_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --force each file is placed by os.link (an exclusive create): the plan's fails after the model's."""
    torch.save(small_net(), tmp_path / "net.pt")
    real_link = os.link
    calls: list[str] = []

    def plan_link_fails(src: Any, dst: Any, *a: Any, **k: Any) -> None:
        calls.append(str(dst))
        if str(dst).endswith("light.plan.json"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_link(src, dst, *a, **k)

    monkeypatch.setattr(os, "link", plan_link_fails)
    r = run_cli(["apply", tmp_path / "net.pt", "--recipe", "all_3x3", "--input-shape", SHAPE_ARG,
                 "-o", tmp_path / "light.pt"])
    assert_clean_cli_error("rename failed (new files)", r, ("could not write",))
    assert [Path(c).name for c in calls] == ["light.pt", "light.plan.json"], calls
    assert listing(tmp_path) == ["net.pt"]


def test_successful_apply_writes_exactly_its_outputs(out_dir: Path) -> None:
    """The positive control of the cases above: same command, no fault."""
    r = _apply_force(out_dir, "--report", str(out_dir / "r.json"))
    assert r.exit_code == 0, r.output
    assert listing(out_dir) == ["light.plan.json", "light.pt", "net.pt", "r.json"]
    assert load_model(out_dir / "light.pt").kind == "module"
    assert Plan.from_json((out_dir / "light.plan.json").read_text()).replaced
    assert plan_path_for(out_dir / "light.pt") == out_dir / "light.plan.json"


def test_rewritten_model_shares_no_tensor_with_the_original() -> None:
    """The copy skips the weights of replaced convs (memory); nothing of the result may alias the user's model."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = small_net()
            self.again = self.body[2]  # an alias: the conv's weights are held under two names

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    for model in (small_net(), Tied().eval()):
        snap = snapshot(model)
        light = dsrewrite.rewrite(model, "all_3x3", example_inputs=x_in())
        originals = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
        shared = [n for n, t in [*light.named_parameters(), *light.named_buffers()] if t.data_ptr() in originals]
        assert not shared, f"{type(model).__name__}: the result aliases the original's tensors {shared}"
        with torch.no_grad():
            for t in light.parameters():
                t.add_(1.0)
        assert_untouched(model, snap)
