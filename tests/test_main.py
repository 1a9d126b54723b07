"""``python -m dsrewrite`` and the documented torchrun line for healing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("WORLD_SIZE", None)
    return env


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=timeout)


def test_python_m_dsrewrite_help(tmp_path: Path) -> None:
    r = _run([sys.executable, "-m", "dsrewrite", "--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: dsrewrite "), r.stdout
    for command in ("apply", "heal", "inspect", "plan"):
        assert command in r.stdout


def test_python_m_dsrewrite_heal_help(tmp_path: Path) -> None:
    r = _run([sys.executable, "-m", "dsrewrite", "heal", "--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Usage: dsrewrite heal " in r.stdout and "--rewritten" in r.stdout


def test_the_old_heal_module_line_says_where_it_moved(tmp_path: Path) -> None:
    r = _run([sys.executable, "-m", "dsrewrite.heal", "--help"], tmp_path)
    assert r.returncode == 1
    assert "python -m dsrewrite heal" in r.stderr


@pytest.fixture(scope="module")
def torchrun_heal(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny model, its rewrite and data; then the documented torchrun line with 2 processes."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip(f"no torchrun beside {sys.executable}")
    d = tmp_path_factory.mktemp("torchrun")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 3, 3, padding=1))
    torch.save(net, d / "net.pt")
    torch.save(torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)), d / "data.pt")
    r = _run([sys.executable, "-m", "dsrewrite", "apply", "net.pt", "--recipe", "all_3x3", "--input-shape",
              "1,3,8,8", "-o", "net.ds.pt"], d)
    assert r.returncode == 0, r.stderr
    (d / "out").mkdir()
    r = _run([str(torchrun), "--nproc_per_node=2", "--standalone", "-m", "dsrewrite", "heal", "net.pt",
              "--rewritten", "net.ds.pt", "--data", "data.pt", "--input-shape", "1,3,8,8", "--steps", "4",
              "--batch-size", "4", "--lr", "1e-3", "-o", "out/healed.pt"], d, timeout=600)
    return {"dir": d, "run": r}


@pytest.mark.slow  # two processes plus an apply: about a minute on 2 cores
def test_torchrun_heal_writes_a_healed_model(torchrun_heal: dict) -> None:
    d, r = torchrun_heal["dir"], torchrun_heal["run"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in (d / "out").iterdir()) == ["healed.pt"], "temporary files left behind"
    from dsrewrite.io import load_model

    healed = load_model(str(d / "out" / "healed.pt")).model
    rewritten = load_model(str(d / "net.ds.pt")).model
    assert type(healed[2]).__name__ == "DepthwiseSeparableConv2d"
    moved = max((a - b).abs().max().item() for a, b in zip(healed.state_dict().values(),
                                                             rewritten.state_dict().values()))
    assert moved > 0, "4 steps of Adam at lr 1e-3 changed no weight"
    assert "distillation loss" in r.stdout + r.stderr


@pytest.mark.slow
def test_torchrun_heal_writes_the_output_once(torchrun_heal: dict) -> None:
    r = torchrun_heal["run"]
    assert r.returncode == 0
    out = r.stdout + r.stderr
    assert out.count("wrote out/healed.pt") == 1, r.stderr[-2000:]
    assert out.count("distillation loss") == 1 and "x 2 processes" in out, out[-2000:]
