"""Model I/O: typed load errors, the restricted unpickler, arch specs, atomic saving, the plan sidecar."""

from __future__ import annotations

import errno
import io
import os
import pickle
import subprocess
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torchvision
from torch import nn

from dsrewrite.demo import demo_unet
from dsrewrite.errors import ModelLoadError, OutputError, UnsafePickleError, UsageError
from dsrewrite.io import (
    atomic_save,
    atomic_write_bytes,
    check_output_path,
    default_output_path,
    load_model,
    load_rewrite,
    save_rewrite,
)
from dsrewrite.io.load import build_arch, read_torch_file
from dsrewrite.plan_types import LayerConfig, Plan, PlanEntry


def _x(h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    a.eval()
    b.eval()
    with torch.no_grad():
        ya, yb = a(x), b(x)
    err = (ya - yb).abs().max().item()
    assert err == 0.0, f"outputs differ after reload: max abs error {err:.3e}"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18(weights=None)
    out = {"dir": d}
    out["r18_sd"] = d / "r18_sd.pt"
    torch.save(r18.state_dict(), out["r18_sd"])
    out["r18_full"] = d / "r18_full.pt"
    torch.save(r18, out["r18_full"])
    full = out["r18_full"].read_bytes()
    out["truncated"] = d / "truncated.pt"
    out["truncated"].write_bytes(full[: len(full) // 2])
    out["empty"] = d / "empty.pt"
    out["empty"].write_bytes(b"")
    out["text"] = d / "notes.pt"
    out["text"].write_text("this is not a torch file\n")
    out["zip"] = d / "archive.pt"
    with zipfile.ZipFile(out["zip"], "w") as zf:
        zf.writestr("readme.txt", "hello")
    out["list"] = d / "list.pt"
    torch.save([1, 2, 3], out["list"])
    out["script"] = d / "script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        torch.jit.script(nn.Linear(2, 2)).save(str(out["script"]))
    return out


# ----------------------------------------------------------------------------- load errors

LOAD_ERRORS: list[tuple[str, str, dict[str, Any], tuple[str, ...]]] = [
    ("missing", "nope.pt", {}, ("not found", "nope.pt")),
    ("empty", "empty", {}, ("empty", "0 bytes")),
    ("truncated", "truncated", {}, ("truncated or corrupt", "Re-save")),
    ("not_torch", "text", {}, ("not a torch file", "torch.save")),
    ("no_arch", "r18_sd", {}, ("state dict", "--arch", "timm:resnet18", "torchvision:resnet18")),
    ("arch_mismatch", "r18_sd", {"arch": "torchvision:resnet34"},
     ("does not fit arch 'torchvision:resnet34'", "missing", "layer1.2.conv1.weight")),
    ("bad_arch_spec", "r18_sd", {"arch": "resnet18"}, ("unknown arch spec 'resnet18'", "timm:resnet18")),
    ("unknown_timm", "timm:resnet81", {}, ("unknown timm model 'resnet81'", "did you mean 'resnet18'")),
    ("unknown_tv", "torchvision:resnt18", {}, ("unknown torchvision model", "did you mean 'resnet18'")),
    ("zip_not_torch", "zip", {}, ("zip archive but not a torch file",)),
    ("not_model", "list", {}, ("holds a list", "not a model or a state dict")),
    ("torchscript", "script", {}, ("TorchScript",)),
    ("directory", "dir", {}, ("is a directory",)),
    ("bare_name", "resnet18", {}, ("neither a file nor a model spec", "timm:resnet18")),
    ("bad_factory", "dsrewrite.demo:demo_unett", {}, ("has no 'demo_unett'", "did you mean 'demo_unet'")),
    ("missing_pkg", "no_such_pkg_xyz.models:build", {}, ("cannot import module 'no_such_pkg_xyz.models'",)),
]


@pytest.mark.parametrize("case,spec,kwargs,fragments", LOAD_ERRORS, ids=[c[0] for c in LOAD_ERRORS])
def test_load_errors(files: dict[str, Path], case: str, spec: str, kwargs: dict[str, Any],
                     fragments: tuple[str, ...]) -> None:
    target: Any = files[spec] if spec in files else (files["dir"] / spec if spec.endswith(".pt") else spec)
    with pytest.raises(ModelLoadError) as info:
        load_model(target, **kwargs)
    assert not isinstance(info.value, UnsafePickleError)
    assert isinstance(info.value, UsageError)  # CLI exit 2
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


# ----------------------------------------------------------------------------- malicious pickles


class _SystemPayload:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> Any:
        return (os.system, (self.cmd,))


class _ModuleWithPayload(nn.Module):
    def __init__(self, cmd: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.extra = _SystemPayload(cmd)


class _MarkerModule(nn.Module):
    """A module whose constructor has a side effect: pickles must never call it."""

    def __init__(self, marker: str = "") -> None:
        super().__init__()
        if marker:
            Path(marker).write_text("constructed")


class _CallsConstructor:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (_MarkerModule, (self.marker,))


@pytest.mark.parametrize("wrap", ["bare", "in_module", "in_dict"])
def test_os_system_payload_refused(tmp_path: Path, wrap: str) -> None:
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    obj = {"bare": _SystemPayload(cmd), "in_module": _ModuleWithPayload(cmd),
           "in_dict": {"state_dict": {"w": torch.ones(1)}, "hook": _SystemPayload(cmd)}}[wrap]
    path = tmp_path / "evil.pt"
    torch.save(obj, path)
    with pytest.raises(UnsafePickleError) as info:
        load_model(path, arch="torchvision:resnet18")
    msg = str(info.value)
    assert "posix.system" in msg or "os.system" in msg, msg
    assert "--trust-pickle" in msg and str(path) in msg
    assert not marker.exists(), "the payload ran"
    # the payload is real: plain unpickling (the opt-out) does run it
    try:
        load_model(path, trust_pickle=True)
    except ModelLoadError:
        pass  # 'bare' and 'in_dict' hold no model; the payload has run by then
    assert marker.exists(), "test payload is inert, so the check above proves nothing"


@pytest.mark.parametrize("payload,name", [
    ((eval, ("1+1",)), "builtins.eval"),
    ((subprocess.Popen, (["true"],)), "subprocess.Popen"),
    ((getattr, ("abc", "upper")), "builtins.getattr"),
])
def test_other_globals_refused(tmp_path: Path, payload: tuple[Any, ...], name: str) -> None:
    class P:
        def __reduce__(self) -> Any:
            return payload

    path = tmp_path / "evil.pt"
    torch.save({"x": P()}, path)
    with pytest.raises(UnsafePickleError, match=name.replace(".", r"\.")):
        load_model(path)


def test_admitted_module_constructor_not_callable(tmp_path: Path) -> None:
    marker = tmp_path / "constructed"
    path = tmp_path / "ctor.pt"
    torch.save({"m": _CallsConstructor(str(marker))}, path)
    with pytest.raises(UnsafePickleError, match="refused to call"):
        load_model(path)
    assert not marker.exists()


def test_legacy_format_restricted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    good, evil, marker = tmp_path / "good.pt", tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save(model, good, _use_new_zipfile_serialization=False)
    # torch's weights-only loader cannot read a legacy whole-module file (it stores module source):
    # refused with the way out, and a legacy state dict still loads.
    with pytest.raises(ModelLoadError, match="legacy format.*Re-save"):
        load_model(good)
    sd = tmp_path / "sd.pt"
    torch.save(model.state_dict(), sd, _use_new_zipfile_serialization=False)
    again = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    again.load_state_dict(read_torch_file(sd)[0])
    _assert_same_outputs(model, again, _x(16, 16))
    torch.save({"x": _SystemPayload(f"touch {marker}")}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafePickleError, match="system"):
        load_model(evil)
    assert not marker.exists()
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ModelLoadError, match="not a torch file"):
        load_model(plain)


def test_fx_graph_module_refused(tmp_path: Path) -> None:
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    path = tmp_path / "gm.pt"
    torch.save(gm, path)
    with pytest.raises(UnsafePickleError, match="torch.fx.graph_module"):
        load_model(path)


# ----------------------------------------------------------------------------- good loads


def _smp_unet() -> nn.Module:
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    return smp.Unet("resnet18", encoder_weights=None, classes=2)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "smp_unet": _smp_unet,
    "torchvision_resnet18": lambda: torchvision.models.resnet18(weights=None),
    "demo_unet": lambda: demo_unet(seed=3),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_full_module_round_trip_restricted(tmp_path: Path, name: str) -> None:
    model = MODELS[name]().eval()
    path = tmp_path / f"{name}.pt"
    torch.save(model, path)
    with pytest.raises(Exception):  # weights_only alone cannot read it: the restricted path is exercised
        torch.load(path, weights_only=True)
    loaded = load_model(path)
    assert loaded.kind == "module" and "weights-only unpickler" in loaded.source
    assert type(loaded.model) is type(model)
    _assert_same_outputs(model, loaded.model, _x())


def test_data_parallel_unwrapped(tmp_path: Path) -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "dp.pt"
    torch.save(nn.DataParallel(model), path)
    loaded = load_model(path)
    assert type(loaded.model) is torchvision.models.ResNet
    assert "unwrapped nn.DataParallel" in loaded.source
    _assert_same_outputs(model, loaded.model, _x())


@pytest.mark.parametrize("key", [None, "state_dict", "model_state_dict", "model"])
def test_prefixed_state_dict_into_arch(tmp_path: Path, key: str | None) -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    obj: Any = sd if key is None else {key: sd, "epoch": 3, "optimizer": {"lr": 0.1}}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    loaded = load_model(path, arch="torchvision:resnet18")
    assert loaded.kind == "state_dict" and "stripped 'module.' prefix" in loaded.source
    assert "weights_only" in loaded.source
    _assert_same_outputs(model, loaded.model, _x())


def test_trust_pickle_loads_plainly(files: dict[str, Path]) -> None:
    loaded = load_model(files["r18_full"], trust_pickle=True)
    assert loaded.kind == "module" and "trusted pickle" in loaded.source


@pytest.mark.parametrize("spec,kind,cls", [
    ("demo", "demo", "ShapesUnet"),
    ("demo:resnet18", "demo", "DemoUnet"),
    ("timm:resnet18", "arch", "ResNet"),
    ("torchvision:resnet18", "arch", "ResNet"),
    ("smp:Unet:resnet18", "arch", "Unet"),
    ("dsrewrite.demo:demo_unet", "arch", "DemoUnet"),
])
def test_arch_specs(spec: str, kind: str, cls: str) -> None:
    loaded = load_model(spec)
    assert (loaded.kind, type(loaded.model).__name__, loaded.source_spec) == (kind, cls, spec)


def test_arch_specs_never_download(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.hub

    def no_download(*a: Any, **k: Any) -> None:
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    build_arch("torchvision:deeplabv3_mobilenet_v3_large")  # would fetch a backbone with default args


# ----------------------------------------------------------------------------- atomic saving


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("existed", [True, False])
def test_atomic_save_enospc_mid_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existed: bool) -> None:
    path = tmp_path / "out.pt"
    if existed:
        path.write_bytes(b"previous content")
    real_save = torch.save
    written: list[int] = []

    def failing_save(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        written.append(len(data) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OutputError) as info:
        atomic_save(nn.Linear(64, 64), path)
    assert written and written[0] > 0, "the fake write wrote nothing; the test would not detect a partial file"
    assert str(path) in str(info.value) and "No space left" in str(info.value)
    assert _listing(tmp_path) == (["out.pt"] if existed else [])
    if existed:
        assert path.read_bytes() == b"previous content"


def test_atomic_write_bytes_fsync_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "plan.json"
    path.write_text("old")

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OutputError, match="plan.json"):
        atomic_write_bytes(b"new content", path)
    assert _listing(tmp_path) == ["plan.json"] and path.read_text() == "old"


def test_atomic_write_interrupt_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({}, tmp_path / "x.pt")
    assert _listing(tmp_path) == []


def test_atomic_save_round_trip_and_mode(tmp_path: Path) -> None:
    path = atomic_save({"w": torch.arange(3.0)}, tmp_path / "sd.pt")
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3.0))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert _listing(tmp_path) == ["sd.pt"]


# ----------------------------------------------------------------------------- output paths


def test_check_output_path_cases(tmp_path: Path, unwritable_dir: Callable[[], Path]) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(b"x")
    link = tmp_path / "link.pt"
    link.symlink_to(model)
    cases: list[tuple[Path, dict[str, Any], str]] = [
        (model, {"input_path": model, "force": True}, "is the input model file"),
        (link, {"input_path": model, "force": True}, "is the input model file"),
        (model, {}, "--force"),
        (tmp_path / "missing" / "out.pt", {}, "does not exist"),
        (tmp_path, {}, "is a directory"),
        (unwritable_dir() / "out.pt", {}, "not writable"),
    ]
    for out, kwargs, frag in cases:
        with pytest.raises(OutputError) as info:
            check_output_path(out, **kwargs)
        assert frag in str(info.value), (out, str(info.value))
        assert "\n" not in str(info.value)
    assert check_output_path(model, force=True) == model
    assert check_output_path(tmp_path / "new.pt", input_path=model) == tmp_path / "new.pt"
    assert _listing(tmp_path) == ["link.pt", "model.pt"]  # probing left nothing behind


def test_default_output_path(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(b"x")
    assert default_output_path(model) == tmp_path / "model.ds.pt"
    assert default_output_path(str(model)) == tmp_path / "model.ds.pt"
    assert default_output_path("runs/a.pth") == Path("runs/a.ds.pth")
    assert default_output_path("ckpt.safetensors") == Path("ckpt.ds.pt")
    assert default_output_path("demo") == Path("demo.ds.pt")
    assert default_output_path("timm:resnet18") == Path("timm_resnet18.ds.pt")
    assert default_output_path("mypkg.models:build") == Path("mypkg.models_build.ds.pt")


# ----------------------------------------------------------------------------- save_rewrite / load_rewrite


def _demo_plan() -> Plan:
    names = ["decoder.blocks.0.conv2.0", "decoder.blocks.2.conv1.0", "decoder.blocks.4.conv2.0"]
    cfgs = [LayerConfig(), LayerConfig(order="pw_dw", depth_multiplier=2), LayerConfig(mid_norm="batchnorm")]
    entries = tuple(PlanEntry(name=n, action="replace", reason="test", config=c) for n, c in zip(names, cfgs))
    skip = PlanEntry(name="decoder.blocks.0.conv1.0", action="skip", reason="test skip")
    return Plan(entries=entries + (skip,), recipe="test", capture="fx", input_shape=(1, 3, 64, 64))


def test_save_and_load_rewrite_round_trip(tmp_path: Path) -> None:
    from dsrewrite.apply import apply_plan

    plan = _demo_plan()
    rewritten = apply_plan(demo_unet(seed=1), plan).eval()
    weights, plan_file = save_rewrite(rewritten, plan, tmp_path / "out.pt")
    assert (weights, plan_file) == (tmp_path / "out.pt", tmp_path / "out.plan.json")
    assert Plan.from_json(plan_file.read_text()) == plan
    x = _x(seed=4)
    with torch.no_grad():
        ref = rewritten(x)

    def check(model: nn.Module) -> None:
        with torch.no_grad():
            err = (model.eval()(x) - ref).abs().max().item()
        assert err == 0.0, f"reloaded rewrite differs: max abs error {err:.3e}"

    # the full module reloads through the restricted unpickler
    check(load_model(weights).model)
    # fresh architecture + plan + weights, from the full-module file and from a state-dict file
    sd_file = tmp_path / "out_sd.pt"
    torch.save(rewritten.state_dict(), sd_file)
    for w in (weights, sd_file):
        fresh = demo_unet(seed=9)
        planned = [e.name for e in plan.replaced]
        before = {n: fresh.get_submodule(n).weight.clone() for n in planned}
        check(load_rewrite(fresh, plan_file, w))
        for n in planned:  # the caller's fresh model is not mutated
            conv = fresh.get_submodule(n)
            assert type(conv) is nn.Conv2d and torch.equal(conv.weight, before[n]), n


def test_load_rewrite_weights_mismatch(tmp_path: Path) -> None:
    plan = _demo_plan()
    sd_file = tmp_path / "dense.pt"
    torch.save(demo_unet().state_dict(), sd_file)  # dense weights do not fit the rewritten layout
    plan_file = tmp_path / "p.plan.json"
    plan_file.write_text(plan.to_json())
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_rewrite(demo_unet(), plan_file, sd_file)


def test_save_rewrite_checks_both_paths_first(tmp_path: Path) -> None:
    (tmp_path / "out.plan.json").write_text("old plan")
    with pytest.raises(OutputError, match="out.plan.json"):
        save_rewrite(nn.Linear(2, 2), _demo_plan(), tmp_path / "out.pt")
    assert _listing(tmp_path) == ["out.plan.json"]  # nothing written
    src = tmp_path / "in.pt"
    src.write_bytes(b"x")
    with pytest.raises(OutputError, match="is the input"):
        save_rewrite(nn.Linear(2, 2), _demo_plan(), src, input_path=src, force=True)
    assert src.read_bytes() == b"x"
