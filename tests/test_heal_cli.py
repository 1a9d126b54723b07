# SPDX-License-Identifier: Apache-2.0
"""`dsrewrite heal` from the command line: every option of heal(), killed and resumed, progress, bad options."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from dsrewrite.cli import main
from dsrewrite.io import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; the subprocesses get OMP_NUM_THREADS=1

ROOT = Path(__file__).resolve().parent.parent


def run(args, cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """A small conv net, its all_3x3 rewrite and 200 images (3×12×12) in one tensor file."""
    d = tmp_path_factory.mktemp("heal_cli")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 3, 3, padding=1))
    torch.save(net, d / "net.pt")
    torch.save(torch.randn(200, 3, 12, 12, generator=torch.Generator().manual_seed(1)), d / "data.pt")
    r = run(["apply", "net.pt", "--recipe", "all_3x3", "--input-shape", "1,3,12,12", "-o", "net.ds.pt"], d)
    assert r.exit_code == 0, r.output
    return d


#: 200 images in batches of 8: 25 batches an epoch; 40 steps wrap into the second (reshuffled) epoch
HEAL = ["heal", "net.pt", "--rewritten", "net.ds.pt", "--data", "data.pt", "--input-shape", "1,3,12,12",
        "--steps", "40", "--batch-size", "8", "--lr", "3e-3", "--schedule", "cosine", "--warmup", "5",
        "--layer-weight", "0.5", "--output-loss", "mse", "--trainable", "all", "--device", "cpu", "--seed", "3"]

#: Runs the CLI in a subprocess and SIGKILLs it while it computes step KILL_AT (after the step-20 checkpoint).
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import dsrewrite.refit.heal as h
    KILL_AT, seen = int(os.environ["KILL_AT"]), [0]
    real = h.to_device
    def to_device(*a, **k):  # called once per step, on the step's batch
        seen[0] += 1
        if seen[0] == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    h.to_device = to_device
    from dsrewrite.cli import main
    main(sys.argv[1:], prog_name="dsrewrite")
    """
)


def test_killed_and_resumed_heal_gives_the_weights_of_an_uninterrupted_run(pair: Path) -> None:
    straight = run(HEAL + ["-o", "straight.pt"], pair)
    assert straight.exit_code == 0, straight.output
    assert "distillation loss" in straight.stdout and "on the example input" in straight.stdout, straight.stdout
    assert "(320 samples drawn from the 200 in data.pt)" in straight.stdout, straight.stdout
    fid = re.search(r"fidelity on the first healing batches \(4 batches\): rel L2 (\S+) → (\S+),", straight.stdout)
    assert fid and float(fid.group(2)) < float(fid.group(1)), straight.stdout  # healing moved the outputs closer

    (pair / "killer.py").write_text(KILLER)
    env = dict(os.environ, KILL_AT="23", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    killed = subprocess.run([sys.executable, "killer.py", *HEAL, "-o", "resumed.pt", "--checkpoint", "ck.pt",
                             "--checkpoint-every", "10"], cwd=pair, env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(p.name for p in pair.iterdir() if p.name.startswith(("ck", "resumed", ".ck", ".resumed"))) == \
        ["ck.pt"], "the kill left something besides the step-20 checkpoint"
    ck = torch.load(pair / "ck.pt", weights_only=True)
    assert ck["step"] == 20 and ck["data"] == {"consumed": 20, "epoch": 0, "index": 20}

    resumed = run(HEAL + ["-o", "resumed.pt", "--checkpoint", "ck.pt", "--resume"], pair)
    assert resumed.exit_code == 0, resumed.output
    assert "over steps 21..40" in resumed.stdout and "resumed" in resumed.stdout, resumed.stdout
    a = load_model(str(pair / "straight.pt")).model.state_dict()
    b = load_model(str(pair / "resumed.pt")).model.state_dict()
    rewritten = load_model(str(pair / "net.ds.pt")).model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: resumed differs by {float((a[k] - b[k]).abs().max())}"
    assert any(not torch.equal(a[k], rewritten[k]) for k in a), "healing changed no weight"
    assert torch.load(pair / "ck.pt", weights_only=True)["step"] == 40


def test_progress_lines_with_v_and_none_with_q(pair: Path) -> None:
    base = ["heal", "net.pt", "--rewritten", "net.ds.pt", "--data", "data.pt", "--input-shape", "1,3,12,12",
            "--steps", "4", "--log-every", "2", "--fidelity-batches", "1", "--force"]
    loud = run(["-v"] + base + ["-o", "p.pt"], pair)
    assert loud.exit_code == 0, loud.output
    assert "[heal] step 2/4 loss" in loud.stderr and "[heal] step 4/4" in loud.stderr, loud.stderr
    quiet = run(["-q"] + base + ["-o", "p.pt"], pair)
    assert quiet.exit_code == 0 and "[heal]" not in quiet.stderr and "loading" not in quiet.stderr, quiet.stderr
    piped = run(base + ["-o", "p.pt"], pair)  # CliRunner's stderr is not a terminal: no progress
    assert piped.exit_code == 0 and "[heal]" not in piped.stderr, piped.stderr
    assert "distillation loss" in piped.stdout  # the result is printed either way


@pytest.mark.parametrize("extra, message", [
    (["--checkpoint-every", "5"], "--checkpoint-every needs --checkpoint"),
    (["--resume"], "--resume needs --checkpoint"),
    (["--device", "tpu9"], "is not a device"),
    (["--schedule", "cosin"], "'cosin' is not one of"),
    (["--trainable", "some"], "'some' is not one of"),
])
def test_bad_heal_options_exit_2_before_any_work(pair: Path, extra: list[str], message: str) -> None:
    r = run(HEAL + extra + ["-o", "never.pt"], pair)
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (pair / "never.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_refused(pair: Path) -> None:
    r = run(HEAL + ["--device", "cuda", "-o", "never.pt"], pair)
    assert r.exit_code == 2 and "CUDA is not available" in r.output, r.output


def test_device_auto_and_cuda_pin_the_local_rank(monkeypatch) -> None:
    """`cuda` (and `auto` where CUDA is available) means cuda:LOCAL_RANK under torchrun."""
    from dsrewrite.refit.heal_run import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("cuda") == torch.device("cuda", 0)
