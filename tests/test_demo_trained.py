"""The trained demo: shipped weights come from bench/train_demo.py, its mIoU is what the docs say, and the
first command a newcomer runs shows the point (mIoU of the original, after SVD, after calibration)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsrewrite.io import load_model
from dsrewrite.shapes import WEIGHTS, ShapesUnet, evaluate_miou, held_out, trained_unet

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "demo.md"


def _documented(name: str) -> float:
    """A number the docs state as ``<!-- name -->VALUE``."""
    m = re.search(rf"<!-- {name} -->\s*([0-9.]+)", DOC.read_text(encoding="utf-8"))
    assert m, f"docs/demo.md does not state {name}"
    return float(m.group(1))


def test_demo_names_the_trained_model_and_resnet18_stays_available() -> None:
    trained, random18 = load_model("demo"), load_model("demo:resnet18")
    assert type(trained.model) is ShapesUnet and not trained.model.training
    assert type(random18.model).__name__ == "DemoUnet"
    assert "trained" in trained.source and "random weights" in random18.source


def test_shipped_weights_are_small_and_safetensors() -> None:
    data = WEIGHTS.read_bytes()
    assert len(data) < 4 * 2**20, f"{len(data)} bytes: too big to ship"
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert "__metadata__" in header and header["__metadata__"]["producer"] == "bench/train_demo.py"


def test_demo_miou_is_what_the_docs_say() -> None:
    x, y = held_out()
    got = 100 * evaluate_miou(trained_unet(), x, y)
    assert abs(got - _documented("heldout-miou")) < 0.005, f"held-out mIoU {got:.3f}, docs say {_documented('heldout-miou')}"
    assert got > 70, f"the demo model is not trained: mIoU {got:.2f}"


def test_shipped_weights_hash_is_what_the_docs_say() -> None:
    sha = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    m = re.search(r"<!-- weights-sha256 -->\s*`?([0-9a-f]{64})", DOC.read_text(encoding="utf-8"))
    assert m and m.group(1) == sha, f"docs/demo.md states {m.group(1) if m else None}, the file is {sha}"


@pytest.mark.slow
def test_shipped_weights_are_what_the_script_trains(tmp_path: Path) -> None:
    """Retrain with bench/train_demo.py (one thread, deterministic): the same bytes as the shipped file."""
    out = tmp_path / "w.safetensors"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "train_demo.py"), "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=3600)
    assert r.returncode == 0, r.stderr[-2000:]
    got, shipped = hashlib.sha256(out.read_bytes()).hexdigest(), hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert got == shipped, f"retrained weights {got} differ from the shipped {shipped}"


def test_first_command_prints_the_task_metric_before_and_after(tmp_path: Path) -> None:
    """`dsrewrite apply demo --recipe decoder_only --calib demo`: mIoU of the original, after SVD, after calibration."""
    from click.testing import CliRunner

    from dsrewrite.cli import main

    r = CliRunner().invoke(main, ["apply", "demo", "--recipe", "decoder_only", "--calib", "demo", "--calib-limit", "16",
                                  "-o", str(tmp_path / "demo.ds.pt"), "--json"])
    assert r.exit_code == 0, r.output
    task = json.loads(r.stdout)["task"]
    assert task["name"].startswith("mIoU")
    assert abs(task["original"] - _documented("heldout-miou")) < 0.005, task
    assert task["svd"] < task["original"] and task["calibrated"] > task["svd"], task


def test_heal_shows_the_recovery(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dsrewrite.cli import main

    out = tmp_path / "demo.ds.pt"
    r = CliRunner().invoke(main, ["apply", "demo", "--recipe", "decoder_only", "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["heal", "demo", "--rewritten", str(out), "--data", "demo", "--steps", "30",
                                  "--lr", "3e-4", "-o", str(tmp_path / "healed.pt")])
    assert r.exit_code == 0, r.output
    m = re.search(r"rewritten ([0-9.]+) → healed ([0-9.]+)", r.output)
    assert m and float(m.group(2)) > float(m.group(1)), r.output
