"""``dsrewrite export`` and ``apply --export``: runtime files from the deployment form, checked against PyTorch.

Numerical checks compare the runtime's outputs with the model run eagerly, within the dtype-aware
tolerance of :func:`dsrewrite.runtime.tolerance.parity_tolerance`, and print the max error on failure.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cli_checks import assert_clean_cli_error, run_cli
from dsrewrite.deploy import ExecutorchMissingError, ParityError, export_model
from dsrewrite.deploy import executorch as deploy_executorch
from dsrewrite.deploy import onnx as deploy_onnx
from dsrewrite.deploy.executorch import executorch_available, export_executorch
from dsrewrite.deploy.parity import flat_outputs
from dsrewrite.io import load_model
from dsrewrite.runtime.tolerance import parity_tolerance

ort = pytest.importorskip("onnxruntime")
SHAPE = "1,3,64,64"


def ort_run(path: Path, x: torch.Tensor) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {session.get_inputs()[0].name: x.numpy()})]


def assert_matches(got: list[torch.Tensor], ref: list[torch.Tensor], label: str) -> None:
    assert len(got) == len(ref), f"{label}: {len(got)} outputs against {len(ref)}"
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == r.shape, f"{label}: output {i} has shape {tuple(g.shape)}, eager {tuple(r.shape)}"
        err, tol = (g.double() - r.double()).abs().max().item(), parity_tolerance(r)
        assert err <= tol, f"{label}: output {i} max |Δ| = {err:.3g} > tolerance {tol:.3g}"


def eager(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return flat_outputs(model.eval()(x), "eager")


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("export") / "demo.onnx"
    old = os.umask(0o022)
    try:
        r = run_cli(["export", "demo", "--input-shape", SHAPE, "-o", path])
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    return path, r


def test_demo_onnx_runs_at_two_batch_sizes_and_two_spatial_sizes(demo_onnx) -> None:
    path, r = demo_onnx
    assert "dynamo exporter" in r.stdout and "max |runtime − PyTorch|" in r.stdout, r.stdout
    assert "1×3×64×64, 2×3×96×96" in r.stdout, "the CLI must check a second shape"
    model = load_model("demo").model
    gen = torch.Generator().manual_seed(3)
    for shape in ((1, 3, 64, 64), (3, 3, 64, 64), (1, 3, 96, 128), (2, 3, 128, 96)):
        x = torch.randn(shape, generator=gen)
        assert_matches(ort_run(path, x), eager(model, x), f"ORT at {shape}")
    inputs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()
    assert [d if isinstance(d, int) else "free" for d in inputs[0].shape] == ["free", 3, "free", "free"]


def test_export_file_mode_follows_the_umask(demo_onnx, tmp_path) -> None:
    path, _ = demo_onnx
    assert stat.S_IMODE(path.stat().st_mode) == 0o644, oct(path.stat().st_mode)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    old = os.umask(0o077)
    try:
        res = export_model(net, torch.randn(1, 3, 16, 16), tmp_path / "private.onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(res.path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["private.onnx"], "temporary files left behind"


def test_static_export_fixes_the_shape(tmp_path) -> None:
    path = tmp_path / "static.onnx"
    r = run_cli(["export", "demo", "--input-shape", SHAPE, "-o", path, "--static"])
    assert r.exit_code == 0, r.output
    assert "static shape" in r.stdout and "no second shape checked" in r.stdout, r.stdout
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 64, 64]
    model = load_model("demo").model
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    assert_matches(ort_run(path, x), eager(model, x), "static file")
    with pytest.raises(Exception):
        ort_run(path, torch.randn(2, 3, 64, 64))


def test_apply_export_runs_the_pipeline_and_a_rewritten_file_exports(tmp_path) -> None:
    out, onnx_path = tmp_path / "demo.ds.pt", tmp_path / "demo.ds.onnx"
    r = run_cli(["apply", "demo", "--recipe", "decoder_only", "--order", "auto", "--input-shape", SHAPE,
                 "-o", out, "--export", onnx_path])
    assert r.exit_code == 0, r.output
    assert out.exists() and onnx_path.exists() and "exported" in r.stdout, r.output
    rewritten = load_model(out).model
    assert any(type(m).__name__ == "DepthwiseSeparableConv2d" for m in rewritten.modules())
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(5))
    assert_matches(ort_run(onnx_path, x), eager(rewritten, x), "apply --export")
    again = tmp_path / "again.onnx"
    r2 = run_cli(["export", out, "--input-shape", SHAPE, "-o", again])
    assert r2.exit_code == 0, r2.output
    assert_matches(ort_run(again, x), eager(rewritten, x), "export of the rewritten file")


class DictNet(nn.Module):
    """Returns {"out", "aux"} in that (unsorted) order, both of the same shape."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.out = nn.Conv2d(8, 2, 1)
        self.aux = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"out": self.out(h), "aux": 3.0 * self.aux(h)}


def test_dict_output_model_exports_and_is_paired_in_its_own_order(tmp_path) -> None:
    torch.manual_seed(0)
    net = DictNet().eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    res = export_model(net, x, tmp_path / "dict.onnx")
    assert res.max_abs_diff <= res.tolerance, str(res)
    got = ort_run(Path(res.path), x)
    with torch.no_grad():
        want = net(x)
    assert_matches(got, [want["out"], want["aux"]], "dict outputs in the model's order")
    sorted_err = (got[0] - want["aux"]).abs().max().item()  # what pairing by sorted key compared
    assert sorted_err > 10 * parity_tolerance(want["aux"]), "the test model must tell the two orders apart"


def test_parity_failure_writes_nothing_and_exits_1(tmp_path, monkeypatch) -> None:
    real = deploy_onnx._run_ort

    def off_by_a_bit(path, args):
        outs, provider = real(path, args)
        return [o + 1e-2 * o.abs().max() for o in outs], provider

    monkeypatch.setattr(deploy_onnx, "_run_ort", off_by_a_bit)
    r = run_cli(["export", "demo", "--input-shape", SHAPE, "-o", tmp_path / "bad.onnx"])
    assert r.exit_code == 1 and "max |Δ| =" in r.stderr and "was not written" in r.stderr, r.output
    assert os.listdir(tmp_path) == []
    with pytest.raises(ParityError):
        export_model(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 16, 16), tmp_path / "c.onnx")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- refusals
def test_bad_format_and_unknown_suffix_are_refused(tmp_path) -> None:
    r = run_cli(["export", "demo", "-o", tmp_path / "m.tflite", "--format", "tflite"])
    assert r.exit_code == 2 and "tflite" in r.output and "Traceback" not in r.output, r.output
    r = run_cli(["export", "demo", "-o", tmp_path / "m.tflite"])
    assert_clean_cli_error("unknown suffix", r, ["cannot tell the export format", ".onnx (onnx)", ".pte (executorch)"])
    assert os.listdir(tmp_path) == []


def test_output_paths_are_checked_before_any_work(tmp_path, monkeypatch) -> None:
    import dsrewrite.io as dsio

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")

    existing = tmp_path / "m.onnx"
    existing.write_bytes(b"keep")
    monkeypatch.setattr(dsio, "load_model", no_load)
    r = run_cli(["export", "demo", "-o", existing])
    assert_clean_cli_error("existing output", r, ["already exists", "--force"])
    assert existing.read_bytes() == b"keep"
    r = run_cli(["export", "demo", "-o", tmp_path / "nope" / "m.onnx"])
    assert_clean_cli_error("missing folder", r, ["does not exist"])
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(b"x")
    r = run_cli(["export", model_file, "-o", model_file, "--force"])
    assert_clean_cli_error("input as output", r, ["is the input model file"])
    r = run_cli(["apply", "demo", "--recipe", "decoder_only", "-o", tmp_path / "a.ds.pt", "--export", existing])
    assert_clean_cli_error("apply --export existing", r, ["already exists"])
    r = run_cli(["apply", "demo", "--recipe", "decoder_only", "-o", tmp_path / "a.ds.pt",
                 "--export", tmp_path / "a.ds.pt", "--export-format", "onnx"])
    assert_clean_cli_error("apply --export = -o", r, ["is the same file as -o", "--export"])
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "model.onnx"]


def hide_executorch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every ``import executorch...`` fail, as where the extra is not installed."""
    names = [n for n in sys.modules if n == "executorch" or n.startswith("executorch.")]
    for name in names + ["executorch", "executorch.exir", "executorch.runtime",
                         "executorch.backends.xnnpack.partition.xnnpack_partitioner"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_edge_extra_says_what_to_install(tmp_path, monkeypatch) -> None:
    hide_executorch(monkeypatch)
    assert not executorch_available()
    r = run_cli(["export", "demo", "-o", tmp_path / "m.pte"])
    assert_clean_cli_error("no executorch", r, ["'edge' extra", "pip install --no-deps", "executorch", "torchao"])
    with pytest.raises(ExecutorchMissingError):
        export_executorch(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), tmp_path / "c.pte")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- ExecuTorch
needs_executorch = pytest.mark.skipif(not executorch_available(),
                                      reason="ExecuTorch (the 'edge' extra) is not installed")


def et_run(path: Path, x: torch.Tensor) -> list[torch.Tensor]:
    return deploy_executorch._run(str(path), (x,))


@needs_executorch
def test_executorch_export_of_the_demo_runs_and_matches(tmp_path) -> None:
    path = tmp_path / "demo.pte"
    r = run_cli(["export", "demo", "--input-shape", SHAPE, "-o", path])
    assert r.exit_code == 0, r.output
    assert "XNNPACK" in r.stdout and "second-shape check applies to ONNX only" in r.stdout, r.stdout
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    assert_matches(et_run(path, x), eager(load_model("demo").model, x), "ExecuTorch")


@needs_executorch
def test_executorch_one_channel_output_keeps_its_shape(tmp_path) -> None:
    """XNNPACK's NHWC result of an N×1×H×W output was resized to N×H×1×W by ExecuTorch 1.5 (see
    ``_SizeOneChannelsSafe``); the export must hand back the model's own shape."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 1)).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    res = export_executorch(net, x, tmp_path / "one.pte")
    assert res.max_abs_diff <= res.tolerance, str(res)
    assert_matches(et_run(tmp_path / "one.pte", x), eager(net, x), "one-channel output")


def test_torchscript_fallback_is_used_and_named_when_dynamo_fails(tmp_path, monkeypatch) -> None:
    real = deploy_onnx._export_file

    def dynamo_fails(model, args, path, opset, exporter, dynamic):
        if exporter == "dynamo":
            raise RuntimeError("simulated dynamo exporter failure")
        return real(model, args, path, opset, exporter, dynamic)

    monkeypatch.setattr(deploy_onnx, "_export_file", dynamo_fails)
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    res = export_model(net, x, tmp_path / "ts.onnx")
    assert "torchscript exporter" in res.exporter and res.dynamic, str(res)
    assert res.checked_shapes == ("1×3×32×32", "2×3×64×64"), str(res)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(res.path).st_mode) == 0o666 & ~umask, "the TorchScript path must respect the umask"
    x2 = torch.randn(3, 3, 48, 40, generator=torch.Generator().manual_seed(10))
    assert_matches(ort_run(tmp_path / "ts.onnx", x2), eager(net, x2), "TorchScript file at another shape")
