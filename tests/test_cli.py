"""The `dsrewrite` command line: README command, round trips, design-note numbers, error table."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import dsrewrite
from dsrewrite.cli import main
from dsrewrite.io import load_model, load_rewrite

smp = pytest.importorskip("segmentation_models_pytorch")

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd=None):
    runner = CliRunner()
    if cwd is not None:
        old = os.getcwd()
        os.chdir(cwd)
    try:
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        if cwd is not None:
            os.chdir(old)


def files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def test_readme_first_command_works_as_written(tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first = re.search(r"```bash\n(python3 -m venv .*?)\n```", text, re.S)
    assert first, "README lost its set-up command"
    cmd = first.group(1).split("&&")[-1].strip()
    argv = shlex.split(cmd)
    assert argv[0].endswith("dsrewrite")
    r = run(argv[1:], cwd=tmp_path)
    assert r.exit_code == 0, r.output
    assert "total MACs" in r.output and "decoder" in r.output
    # the newcomer sees what matters: the task metric before and after (issue: a demo that proves the point)
    assert re.search(r"task metric mIoU.*original [0-9.]+ → after SVD [0-9.]+ → after calibration [0-9.]+", r.output), \
        r.output
    out = argv[argv.index("-o") + 1]
    assert (tmp_path / out).exists() and (tmp_path / out.replace(".pt", ".plan.json")).exists()


@pytest.fixture(scope="module")
def unet_file(tmp_path_factory):
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=2).eval()
    d = tmp_path_factory.mktemp("unet")
    path = d / "unet.pt"
    torch.save(model, path)
    return model, path


def test_apply_round_trip_on_smp_unet(unet_file, tmp_path):
    model, path = unet_file
    out = tmp_path / "light.pt"
    r = run(["apply", path, "--recipe", "decoder_only", "--input-shape", "1,3,64,64", "-o", out,
             "--report", tmp_path / "r.json", "--plot", tmp_path / "r.png"])
    assert r.exit_code == 0, r.output
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    expected = dsrewrite.rewrite(model, "decoder_only", example_inputs=dsrewrite.example_input(model, (1, 3, 64, 64)))
    reloaded = load_model(out).model  # restricted loader
    assert type(reloaded) is type(model)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), expected.eval()(x))
    # rebuilt from the plan on a fresh instance, weights with weights_only=True
    torch.manual_seed(123)
    fresh = smp.Unet("resnet18", encoder_weights=None, classes=2).eval()
    rebuilt = load_rewrite(fresh, out.with_suffix(".plan.json"), out)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), expected(x))
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["totals"]["after"]["macs"] < rep["totals"]["before"]["macs"]
    assert sum(1 for layer in rep["layers"] if layer["replaced"]) == 10
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_design_note_example_numbers(tmp_path):
    model = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1, bias=False))
    path = tmp_path / "note.pt"
    torch.save(model, path)
    r = run(["apply", path, "--recipe", "all_3x3", "--input-shape", "1,64,56,56", "--json", "--dry-run"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["totals"]["before"]["macs"] == 231_211_008
    assert rep["totals"]["after"]["macs"] == 27_496_448
    assert rep["totals"]["before"]["params"] == 73_728
    assert rep["totals"]["after"]["params"] == 8_768
    assert files(tmp_path) == {"note.pt"}  # dry run writes nothing


def test_plan_and_inspect_json(unet_file):
    _, path = unet_file
    r = run(["plan", path, "--recipe", "post_concat", "--input-shape", "1,3,64,64", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert sorted(layer["name"] for layer in rep["layers"] if layer["replaced"]) == [
        f"decoder.blocks.{b}.conv1.0" for b in range(4)]
    assert rep["totals"]["before"]["macs"] == rep["totals"]["after"]["macs"]  # a plan changes nothing
    r = run(["inspect", path, "--input-shape", "1,3,64,64", "--json"])
    assert r.exit_code == 0, r.output
    inv = json.loads(r.stdout)
    assert inv["capture"] == "fx"
    text = json.dumps(inv)
    assert "after_concat" in text and "decoder.blocks.0.conv1.0" in text
    r = run(["plan", path, "--recipe", "post_concat", "--input-shape", "1,3,64,64"])
    assert r.exit_code == 0 and "after concat" in r.output


def test_recipes_list_and_show():
    r = run(["recipes"])
    assert r.exit_code == 0
    for name in ("all_3x3", "decoder_only", "post_concat", "post_upsample", "decoder_high_res"):
        assert name in r.output
    r = run(["recipes", "show", "decoder_only"])
    assert r.exit_code == 0 and "select:" in r.output


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_pickle_with_os_system_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    torch.save({"model": _Payload(marker)}, bad)
    r = run(["apply", bad, "--recipe", "all_3x3", "-o", tmp_path / "o.pt"])
    assert r.exit_code == 2
    assert "system" in r.output and "--trust-pickle" in r.output
    assert not marker.exists(), "the payload ran"
    assert files(tmp_path) == {"bad.pt"}


def _err_cases(tmp_path: Path, unet_path: Path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello, not a torch file\n")
    (tmp_path / "bad.yaml").write_text("select:\n  kernel_sise: [3]\n")
    (tmp_path / "exists.pt").write_bytes(b"keep me")
    return [
        ("missing file", ["apply", tmp_path / "nope.pt", "--recipe", "all_3x3"], "not found"),
        ("empty file", ["apply", tmp_path / "empty.pt", "--recipe", "all_3x3"], "empty"),
        ("not a torch file", ["apply", tmp_path / "text.pt", "--recipe", "all_3x3"], "not a"),
        ("bad recipe", ["apply", unet_path, "--recipe", tmp_path / "bad.yaml", "--dry-run"], "kernel_size"),
        ("unknown built-in", ["apply", unet_path, "--recipe", "decoder_onyl", "--dry-run"], "decoder_only"),
        ("bad shape", ["apply", unet_path, "--recipe", "all_3x3", "--input-shape", "1,3,x"], "input-shape"),
        ("shape the model cannot run", ["apply", unet_path, "--recipe", "all_3x3", "--input-shape", "1,5,64,64",
                                         "-o", tmp_path / "o.pt"], "input"),
        ("existing output", ["apply", unet_path, "--recipe", "all_3x3", "-o", tmp_path / "exists.pt"], "--force"),
        ("output equal to input", ["apply", unet_path, "--recipe", "all_3x3", "-o", unet_path, "--force"], "input"),
        ("selects nothing", ["apply", unet_path, "--recipe", "post_concat", "--input-shape", "1,3,64,64",
                             "--order", "dw_pw", "-o", tmp_path / "o.pt", "--depth-multiplier", "1"], None),
    ]


def test_cli_error_table(tmp_path, unet_file):
    _, unet_path = unet_file
    for label, args, fragment in _err_cases(tmp_path, unet_path):
        if fragment is None:
            continue  # 'selects nothing' is covered below with a model where it is true
        before = files(tmp_path)
        r = run(args)
        assert r.exit_code == 2, f"{label}: exit {r.exit_code}\n{r.output}"
        assert "Traceback" not in r.output, label
        err_lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert 1 <= len(err_lines) <= 3, f"{label}: {r.stderr}"
        assert fragment.lower() in r.output.lower(), f"{label}: {fragment!r} not in {r.output!r}"
        assert files(tmp_path) == before, f"{label}: wrote {files(tmp_path) - before}"
    assert (tmp_path / "exists.pt").read_bytes() == b"keep me"


def test_recipe_that_selects_nothing_is_an_error_in_the_cli(tmp_path):
    path = tmp_path / "pw.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 1)), path)
    r = run(["apply", path, "--recipe", "all_3x3", "--input-shape", "1,3,8,8", "-o", tmp_path / "o.pt"])
    assert r.exit_code == 2 and "selects no conv" in r.output
    assert files(tmp_path) == {"pw.pt"}


def test_debug_shows_traceback(tmp_path):
    r = CliRunner().invoke(main, ["--debug", "apply", str(tmp_path / "nope.pt"), "--recipe", "all_3x3"])
    assert r.exit_code == 2 and "Traceback" in r.output


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_apply_calib_activation_reaches_calibrate(tmp_path, mode):
    g = torch.Generator().manual_seed(0)
    torch.save(torch.randn(2, 3, 32, 32, generator=g), tmp_path / "calib.pt")
    r = run(["apply", "demo:resnet18", "--recipe", "decoder_high_res", "--input-shape", "1,3,32,32", "--dry-run",
             "--calib", tmp_path / "calib.pt", "--calib-activation", mode, "--json"])
    assert r.exit_code == 0, r.output
    layers = json.loads(r.stdout)["calibration"]["layers"]
    fitted = [l["name"] for l in layers if l["activation"]]
    # the demo decoder's convs each feed a BatchNorm2d + ReLU
    assert (len(fitted) == len(layers) > 0) if mode == "auto" else fitted == [], layers


def test_apply_with_calibration_then_heal(tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.save(torch.randn(4, 3, 32, 32, generator=g), tmp_path / "calib.pt")
    out = tmp_path / "d.pt"
    r = run(["apply", "demo:resnet18", "--recipe", "decoder_high_res", "--input-shape", "1,3,32,32",
             "--calib", tmp_path / "calib.pt", "-o", out, "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["calibration"] is not None
    assert "calibration" in rep["fidelity"]
    healed = tmp_path / "h.pt"
    r = run(["heal", "demo:resnet18", "--rewritten", out, "--data", tmp_path / "calib.pt", "--steps", "2",
             "--batch-size", "2", "--input-shape", "1,3,32,32", "-o", healed])
    assert r.exit_code == 0, r.output
    assert "distillation loss" in r.output
    model = load_model(healed).model
    assert sum(type(m).__name__ == "DepthwiseSeparableConv2d" for m in model.modules()) == 6


def test_plan_shows_why_when_the_recipe_selects_nothing(tmp_path):
    """Found in review: `dsrewrite plan` failed with a hint to run the same `dsrewrite plan` command."""
    path = tmp_path / "pw.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 1)), path)
    r = run(["plan", path, "--recipe", "all_3x3", "--input-shape", "1,3,8,8"])
    assert r.exit_code == 0, r.output
    assert "selects no conv" in r.stderr and "already pointwise" in r.stdout, r.output
