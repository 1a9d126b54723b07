"""Same model, recipe and inputs → byte-identical results, in the API and in the files the CLI writes.

The energy-threshold recipe with ``order: auto`` is the one with the most decisions
(a rank per conv from its spectrum, an order per conv from MACs), so it is run too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Union

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import dsrewrite
from dsrewrite.cli import main
from dsrewrite.io import load_model
from dsrewrite.planner import plan

ROOT = Path(__file__).resolve().parents[1]

ENERGY_AUTO: dict[str, Any] = {
    "name": "energy_auto",
    "select": {"kernel_size": ["3x3"], "groups": [1], "in_channels": {"min": 16}, "out_channels": {"min": 16}},
    "replace": {"order": "auto", "energy": 0.9, "init": "svd"},
}
RECIPES: dict[str, Union[str, dict[str, Any]]] = {"all_3x3": "all_3x3", "energy_auto": ENERGY_AUTO}


class TinyUNet(nn.Module):
    """Encoder, bottleneck, upsample + skip concat, decoder: convs where auto order and energy ranks differ."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(3, 16, 3, padding=1)
        self.enc2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(32, 64, 3, padding=1)
        self.dec = nn.Conv2d(64 + 16, 24, 3, padding=1)
        self.dec2 = nn.Conv2d(24, 48, 3, padding=1)
        self.head = nn.Conv2d(48, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.enc1(x))
        y = F.relu(self.mid(F.relu(self.enc2(s))))
        y = F.interpolate(y, scale_factor=2.0, mode="nearest")
        y = F.relu(self.dec(torch.cat([y, s], dim=1)))
        return self.head(F.relu(self.dec2(y)))


def tiny_unet(seed: int = 0) -> TinyUNet:
    torch.manual_seed(seed)
    model = TinyUNet().eval()
    with torch.no_grad():  # decaying spectra, like trained kernels, steeper in some convs than others
        for conv, power in ((model.enc2, 6.0), (model.mid, 0.0), (model.dec, 3.0), (model.dec2, 1.0)):
            conv.weight.mul_(torch.linspace(1.0, 0.05, 9).pow(power).view(1, 1, 3, 3))
    return model


def _x() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def _state_bytes(model: nn.Module) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    return [(k, str(v.dtype), tuple(v.shape), v.detach().contiguous().cpu().numpy().tobytes())
            for k, v in model.state_dict().items()]


def _assert_identical(a: nn.Module, b: nn.Module, label: str) -> None:
    sa, sb = _state_bytes(a), _state_bytes(b)
    assert [s[:3] for s in sa] == [s[:3] for s in sb], f"{label}: keys, dtypes or shapes differ"
    for (k, _, _, ba), (_, _, _, bb), ta, tb in zip(sa, sb, a.state_dict().values(), b.state_dict().values()):
        if ba != bb:
            err = (ta.double() - tb.double()).abs().max().item()
            raise AssertionError(f"{label}: {k} differs between runs: max abs difference {err:.3e}")


@pytest.mark.parametrize("recipe", list(RECIPES), ids=list(RECIPES))
def test_api_rewrite_is_byte_identical_across_runs(recipe: str) -> None:
    runs = []
    for _ in range(2):
        model = tiny_unet()
        p = plan(model, RECIPES[recipe], _x())
        runs.append(dsrewrite.rewrite_with_plan(model, p, _x(), with_report=False))
    assert runs[0].plan.replaced, "nothing replaced: the comparison would be vacuous"
    _assert_identical(runs[0].model, runs[1].model, recipe)
    assert runs[0].plan.to_json() == runs[1].plan.to_json()
    if recipe == "energy_auto":
        cfgs = [e.config for e in runs[0].plan.replaced]
        assert len({c.depth_multiplier for c in cfgs}) > 1, "energy picked one rank everywhere: a weak test"
        assert {c.order for c in cfgs} == {"dw_pw", "pw_dw"}, "auto picked one order everywhere: a weak test"


def test_rewrite_does_not_depend_on_global_rng_state() -> None:
    """SVD init draws no random numbers: a different global seed gives the same weights."""
    torch.manual_seed(1)
    a = dsrewrite.rewrite(tiny_unet(), ENERGY_AUTO, example_inputs=_x())
    torch.manual_seed(2)
    torch.randn(1000)
    b = dsrewrite.rewrite(tiny_unet(), ENERGY_AUTO, example_inputs=_x())
    _assert_identical(a, b, "different global RNG state")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("det") / "tiny.pt"
    torch.save(tiny_unet(), path)
    return path


def _apply(model_file: Path, out: Path, recipe_arg: str) -> None:
    r = CliRunner().invoke(main, ["apply", str(model_file), "--recipe", recipe_arg, "--input-shape", "1,3,32,32",
                                  "-o", str(out), "--report", str(out.with_suffix(".report.json"))],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output


def _recipe_arg(recipe: str, d: Path) -> str:
    if isinstance(RECIPES[recipe], str):
        return str(RECIPES[recipe])
    import yaml

    path = d / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump(RECIPES[recipe]), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("recipe", list(RECIPES), ids=list(RECIPES))
def test_cli_apply_twice_writes_identical_files(model_file: Path, tmp_path: Path, recipe: str) -> None:
    arg = _recipe_arg(recipe, tmp_path)
    outs = [tmp_path / "a" / "light.pt", tmp_path / "b" / "light.pt"]
    for out in outs:
        out.parent.mkdir()
        _apply(model_file, out, arg)
    a, b = (load_model(o).model for o in outs)
    _assert_identical(a, b, f"CLI {recipe}")
    plans = [o.with_suffix(".plan.json").read_bytes() for o in outs]
    assert plans[0] == plans[1], "the plan JSON differs between runs"
    reports = [o.with_suffix(".report.json").read_bytes() for o in outs]
    assert reports[0] == reports[1], "the report JSON differs between runs"


def test_report_with_calibration_is_identical_outside_timing(model_file: Path, tmp_path: Path) -> None:
    """With --calib the report holds a wall-clock time; it is in "timing", and the rest is byte-identical."""
    import json

    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3)), calib)
    reports = []
    for name in ("a", "b"):
        out = tmp_path / name / "light.pt"
        out.parent.mkdir()
        r = CliRunner().invoke(main, ["apply", str(model_file), "--recipe", "all_3x3", "--input-shape", "1,3,32,32",
                                      "--calib", str(calib), "-o", str(out), "--report", str(out.parent / "r.json")],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
        reports.append(json.loads((out.parent / "r.json").read_bytes()))
    for rep in reports:  # the report did calibrate, and timed it: else this test could not fail
        assert rep["calibration"]["images"] == 6 and "seconds" not in rep["calibration"]
        assert rep["timing"]["calibration_seconds"] > 0
    rest = [json.dumps({k: v for k, v in rep.items() if k != "timing"}, indent=2).encode() for rep in reports]
    assert rest[0] == rest[1], "the report JSON differs between runs outside its timing section"


_CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_determinism import tiny_unet, _x, ENERGY_AUTO
import dsrewrite
torch.set_num_threads(int(sys.argv[1]))
m = dsrewrite.rewrite(tiny_unet(), ENERGY_AUTO, example_inputs=_x())
torch.save(m.state_dict(), sys.argv[2])
"""


@pytest.mark.slow
def test_identical_across_processes_hash_seeds_and_thread_counts(tmp_path: Path) -> None:
    """Two fresh interpreters (PYTHONHASHSEED 1 vs 2, 1 vs 2 intra-op threads) write the same weights."""
    code = _CHILD.format(tests=str(ROOT / "tests"))
    outs = []
    for seed, threads in (("1", "1"), ("2", "2")):
        out = tmp_path / f"sd_{seed}.pt"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-c", code, threads, str(out)], check=True, env=env, cwd=tmp_path,
                       timeout=300)
        outs.append(torch.load(out, weights_only=True))
    assert list(outs[0]) == list(outs[1])
    for k in outs[0]:
        assert outs[0][k].dtype == outs[1][k].dtype and torch.equal(outs[0][k], outs[1][k]), \
            f"{k}: max abs difference {(outs[0][k].double() - outs[1][k].double()).abs().max().item():.3e}"
