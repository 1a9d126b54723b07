# SPDX-License-Identifier: Apache-2.0
"""Healing resumes exactly: a run stopped after a checkpoint and resumed ends with bitwise the weights of an
uninterrupted run (CPU), with a seeded shuffled data order, a cosine schedule with warm-up and dropout."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from dsrewrite.layers import DepthwiseSeparableConv2d
from dsrewrite.refit.heal import heal
from dsrewrite.refit.order import SeededBatches
from dsrewrite.refit.heal_state import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class Stop(Exception):
    """Stands for the kill: raised from the callback after the checkpoint was written."""


class Counted(Dataset):
    """Samples from a fixed tensor; remembers which indices were read."""

    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 3, 10, 10, generator=torch.Generator().manual_seed(3))
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        self.read.append(i)
        return self.x[i]


def make_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.2),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    light = copy.deepcopy(net)
    light[3] = DepthwiseSeparableConv2d.from_conv(net[3])
    light[5] = DepthwiseSeparableConv2d.from_conv(net[5])
    return net, light


KW = dict(lr=5e-3, schedule="cosine", warmup=3, train_mode=True, progress=False)


def test_stopped_and_resumed_run_matches_an_uninterrupted_run_bitwise(tmp_path):
    n_steps, every = 12, 5  # 23 samples in batches of 4: 6 batches an epoch, so the run wraps epochs
    net, straight = make_pair()
    torch.manual_seed(7)
    full = heal(straight, net, SeededBatches(Counted(23), 4, seed=1), steps=n_steps, **KW)

    net2, light = make_pair()
    ck = tmp_path / "ck.pt"

    def stop_after(step):
        if step.step == every + 2:  # two steps past the checkpoint: they are lost, as in a kill
            raise Stop

    torch.manual_seed(7)
    with pytest.raises(Stop):
        heal(light, net2, SeededBatches(Counted(23), 4, seed=1), steps=n_steps, checkpoint=ck,
             checkpoint_every=every, callback=lambda s: stop_after(s), **KW)
    ck_data = load_checkpoint(ck)
    assert ck_data["step"] == every and ck_data["data"] == {"consumed": every, "epoch": 0, "index": every}

    _, fresh = make_pair()  # a new process starts from the rewritten model again
    torch.manual_seed(12345)  # and from another RNG state: the checkpoint's must be restored
    data = Counted(23)
    res = heal(fresh, net2, SeededBatches(data, 4, seed=1), steps=n_steps, checkpoint=ck, resume=True, **KW)
    assert res.start_step == every and res.step == n_steps and res.batches_consumed == n_steps
    assert res.losses == full.losses
    for k, v in straight.state_dict().items():
        diff = float((v.float() - fresh.state_dict()[k].float()).abs().max())
        assert torch.equal(v, fresh.state_dict()[k]), f"{k}: resumed run differs from the uninterrupted by {diff}"
    # the resumed run decoded only what it used: batches 5 (last of epoch 0) .. 11 (epoch 1), 4 samples each
    # but the last of an epoch (3): 3 + 4 + 4 + 4 + 4 + 4 + 3 = 26 sample reads
    assert len(data.read) == 26, len(data.read)
    assert load_checkpoint(ck)["data"] == {"consumed": n_steps, "epoch": 2, "index": 0}


def test_resume_without_the_rng_state_would_differ(tmp_path):
    """The RNG part of the test above can fail: dropout draws differ when the state is not restored."""
    net, a = make_pair()
    torch.manual_seed(7)
    heal(a, net, SeededBatches(Counted(8), 4, seed=1), steps=2, **KW)
    _, b = make_pair()
    torch.manual_seed(8)
    heal(b, net, SeededBatches(Counted(8), 4, seed=1), steps=2, **KW)
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_seeded_batches_cover_every_sample_each_epoch_in_a_seeded_order():
    data = SeededBatches(torch.arange(10), 3, seed=5)
    e0 = [int(v) for b in data.epoch(0) for v in b]
    e1 = [int(v) for b in data.epoch(1) for v in b]
    assert sorted(e0) == sorted(e1) == list(range(10)) and e0 != e1
    assert e0 == [int(v) for b in SeededBatches(torch.arange(10), 3, seed=5).epoch(0) for v in b]
    assert e0 != [int(v) for b in SeededBatches(torch.arange(10), 3, seed=6).epoch(0) for v in b]
    assert [int(v) for b in SeededBatches(torch.arange(10), 3, shuffle=False) for v in b] == list(range(10))


def test_an_old_checkpoint_is_refused_with_the_reason(tmp_path):
    from dsrewrite.refit.results import CalibrationUsageError

    torch.save({"format": "dsrewrite-heal-v1", "step": 1}, tmp_path / "old.pt")
    net, light = make_pair()
    with pytest.raises(CalibrationUsageError, match="older dsrewrite"):
        heal(light, net, [torch.randn(1, 3, 10, 10)], steps=2, checkpoint=tmp_path / "old.pt", resume=True,
             progress=False)


def test_resuming_with_another_lr_applies_it_from_the_next_step(tmp_path, caplog):
    net, light = make_pair()
    ck = tmp_path / "ck.pt"
    heal(light, net, [torch.randn(2, 3, 10, 10)], steps=2, lr=1e-2, checkpoint=ck, progress=False)
    seen = []
    heal(light, net, [torch.randn(2, 3, 10, 10)], steps=4, lr=1e-3, schedule="linear", checkpoint=ck, resume=True,
         progress=False, callback=seen.append)
    assert [s.step for s in seen] == [3, 4]
    assert seen[0].lr == pytest.approx(1e-3 * (1 - 2 / 4)) and seen[1].lr == pytest.approx(1e-3 * (1 - 3 / 4))
    assert "learning-rate curve differs" in caplog.text
