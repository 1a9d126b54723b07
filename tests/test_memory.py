"""Peak memory of ``dsrewrite apply`` (issue 13, kind 14): no second copy of the model.

The command's rewrite shares the loaded model's tensors for the layers it keeps
(``rewrite_with_plan(share_weights=True)``) instead of copying them. These tests check
what that may not change: the result is bit-identical to the copying rewrite, the original
keeps its modules and values through calibration and the report (both read it in eval mode
under ``no_grad``, BatchNorm statistics included), and the kept tensors really are shared.
The slow test runs ``bench/memory.py --cli`` on a model whose size dominates the
interpreter's noise and checks the whole command stays at the model plus one copy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dsrewrite
from dsrewrite.planner import plan

ROOT = Path(__file__).resolve().parents[1]


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():  # BatchNorm statistics that are not the defaults: an update would show
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net


def _x(seed: int = 1, n: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train mode (BatchNorm would update)"])
def test_shared_weights_change_nothing(train_mode: bool) -> None:
    original = _net().train(train_mode)
    before, classes = _state(original), {n: type(m) for n, m in original.named_modules()}
    p = plan(original, "all_3x3", _x())
    batches = [_x(seed, 4) for seed in range(3)]
    copied = dsrewrite.rewrite_with_plan(_net().train(train_mode), p, _x(), calibration=batches)
    shared = dsrewrite.rewrite_with_plan(original, p, _x(), calibration=batches, share_weights=True)
    # the original: same modules, same values (calibration and the report only read it)
    assert {n: type(m) for n, m in original.named_modules()} == classes
    now = original.state_dict()
    for k, v in before.items():
        assert torch.equal(now[k], v), f"{k} of the original changed: max {(now[k] - v).abs().max().item():.3e}"
    # the result: identical to the copying rewrite, bit for bit, and its train flag kept
    a, b = copied.model.state_dict(), shared.model.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max {(a[k] - b[k]).abs().max().item():.3e}"
    assert shared.model.training == train_mode
    assert copied.report.to_dict()["fidelity"] == shared.report.to_dict()["fidelity"]
    # shared, not copied: the kept layers hold the original's tensors; the replaced convs are new blocks
    kept = {id(t) for t in [*original.parameters(), *original.buffers()]}
    assert shared.model[9].weight is original[9].weight and shared.model[1].running_mean is original[1].running_mean
    assert id(shared.model[9].weight) in kept and copied.model[9].weight is not original[9].weight
    assert type(shared.model[3]).__name__ != "Conv2d" and type(original[3]) is nn.Conv2d


@pytest.mark.slow
def test_cli_apply_peak_is_at_most_model_plus_one_copy() -> None:
    """``dsrewrite apply`` on torchvision vgg11 (507 MiB, random weights): whole-command peak ≤ 2.0 model sizes
    above the interpreter's baseline, and the load ≤ 1.1 (the state dict is assigned to an arch built on meta;
    it was 2.0 with the state dict and the built model together while copying)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs /proc/self/clear_refs (Linux) for per-phase peaks")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import memory
    finally:
        sys.path.remove(str(ROOT / "bench"))
    rec = memory.measure_cli("vgg11", "all_3x3", (1, 3, 64, 64))
    table = memory._phase_table(rec)
    assert rec["extra_model_copies"] <= 2.0, table
    assert [p["peak_models"] <= 1.1 for p in rec["phases"] if p["phase"] == "load"] == [True], table
    after_load = [p for p in rec["phases"] if p["phase"] in ("apply", "report", "save")]
    assert len(after_load) == 3 and all(p["end_models"] < 1.3 for p in after_load), table
