"""Healing: distillation loss goes down, checkpoints resume exactly, DDP (2 processes, gloo) matches 1 process."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsrewrite.calibrate import CalibrationUsageError
from dsrewrite.heal import heal
from dsrewrite.layers import DepthwiseSeparableConv2d


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1),
    ).eval()
    light = copy.deepcopy(net)
    light[3] = DepthwiseSeparableConv2d.from_conv(net[3])
    light[5] = DepthwiseSeparableConv2d.from_conv(net[5])
    return net, light


def batches(n: int, seed: int = 1, size: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 10, 10, generator=g) for _ in range(n)]


def distill_loss(light: nn.Module, net: nn.Module, data, layer_weight: float = 1.0) -> float:
    """The heal objective, recomputed independently with hooks."""
    s, t = {}, {}
    hs = [light[i].register_forward_hook(lambda m, a, o, i=i: s.__setitem__(i, o)) for i in (3, 5)]
    hs += [net[i].register_forward_hook(lambda m, a, o, i=i: t.__setitem__(i, o)) for i in (3, 5)]
    total = 0.0
    try:
        with torch.no_grad():
            for x in data:
                out = F.mse_loss(light(x), net(x))
                total += float(out + layer_weight * sum(F.mse_loss(s[i], t[i]) for i in (3, 5)))
    finally:
        for h in hs:
            h.remove()
    return total / len(data)


def test_heal_decreases_distillation_loss_and_leaves_teacher_alone():
    net, light = make_pair()
    data = batches(4)
    teacher_state = copy.deepcopy(net.state_dict())
    before = distill_loss(light, net, data)
    res = heal(light, net, data, steps=40, lr=3e-3, progress=False)
    after = distill_loss(light, net, data)
    assert after < 0.7 * before, f"distillation loss {before} -> {after}"
    assert res.step == 40 and res.start_step == 0 and len(res.losses) == 40
    assert sum(res.losses[-5:]) < sum(res.losses[:5])
    assert all(torch.equal(v, teacher_state[k]) for k, v in net.state_dict().items())
    assert not light.training and not net.training
    assert all(not m._forward_hooks for m in list(light.modules()) + list(net.modules()))


@pytest.mark.parametrize("output_loss", ["mse", "kl"])
def test_checkpoint_resume_continues_and_matches_a_straight_run(tmp_path, output_loss):
    data = batches(3)
    kw = dict(lr=1e-2, progress=False, output_loss=output_loss)
    net, straight = make_pair()
    full = heal(straight, net, data, steps=5, **kw)

    net2, light = make_pair()
    ck = tmp_path / "heal.pt"
    first = heal(light, net2, data, steps=3, checkpoint=ck, **kw)
    assert first.step == 3 and ck.is_file()
    _, fresh = make_pair()  # a new process would start from the rewritten model again
    second = heal(fresh, net2, data, steps=5, checkpoint=ck, resume=True, **kw)
    assert second.start_step == 3 and second.step == 5 and len(second.losses) == 5
    assert second.losses[:3] == first.losses
    assert second.losses == full.losses
    for k, v in straight.state_dict().items():
        diff = float((v.float() - fresh.state_dict()[k].float()).abs().max())
        assert torch.equal(v, fresh.state_dict()[k]), f"{k}: resumed run differs from the straight run by {diff}"
    # the checkpoint now says step 5: resuming with steps=5 does nothing
    again = heal(fresh, net2, data, steps=5, checkpoint=ck, resume=True, **kw)
    assert again.start_step == again.step == 5


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_each_step_uses_the_scheduled_rate_with_warmup(schedule):
    """The rate each step used (seen through the callback) against the closed form, warm-up included."""
    net, light = make_pair()
    seen = []
    heal(light, net, batches(2), steps=6, lr=1e-2, schedule=schedule, warmup=2, progress=False, callback=seen.append)
    assert [s.step for s in seen] == list(range(1, 7))
    for s in seen:
        shape = {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * (s.step - 1) / 6)),
                 "linear": 1 - (s.step - 1) / 6}[schedule]
        want = 1e-2 * shape * (s.step / 2 if s.step <= 2 else 1.0)
        assert s.lr == pytest.approx(want, rel=1e-12), (schedule, s.step, s.lr, want)
    assert seen[-1].loss == pytest.approx(seen[-1].output_loss + seen[-1].layer_loss)


def test_checkpoint_every(tmp_path):
    net, light = make_pair()
    ck = tmp_path / "c.pt"
    heal(light, net, batches(2), steps=4, checkpoint=ck, checkpoint_every=2, progress=False)
    assert torch.load(ck, weights_only=True)["step"] == 4


def test_trainable_replaced_freezes_the_rest_and_restores_flags():
    net, light = make_pair()
    light[0].weight.requires_grad_(False)  # a user-frozen parameter stays frozen
    before = copy.deepcopy(light.state_dict())
    heal(light, net, batches(2), steps=5, lr=1e-2, trainable="replaced", progress=False)
    after = light.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        replaced = k.startswith(("3.", "5."))
        assert changed == replaced or "running" in k or "num_batches" in k, k
    assert not light[0].weight.requires_grad and light[0].bias.requires_grad


def test_heal_usage_errors(tmp_path):
    net, light = make_pair()
    with pytest.raises(CalibrationUsageError, match="did you mean 'replaced'"):
        heal(light, net, batches(1), steps=1, trainable="replace", progress=False)
    with pytest.raises(CalibrationUsageError, match="did you mean 'kl'"):
        heal(light, net, batches(1), steps=1, output_loss="kld", progress=False)
    with pytest.raises(CalibrationUsageError, match="needs checkpoint"):
        heal(light, net, batches(1), steps=1, resume=True, progress=False)
    with pytest.raises(CalibrationUsageError, match="does not exist"):
        heal(light, net, batches(1), steps=1, resume=True, checkpoint=tmp_path / "nope.pt", progress=False)
    with pytest.raises(CalibrationUsageError, match="no batches"):
        heal(light, net, [], steps=1, progress=False)
    with pytest.raises(CalibrationUsageError, match="one-shot"):
        heal(light, net, iter(batches(1)), steps=3, progress=False)


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_heal import make_pair, batches
    from dsrewrite.heal import heal
    torch.set_num_threads(1)
    net, light = make_pair()
    res = heal(light, net, batches(4), steps=4, lr=1e-2, progress=False)
    import torch.distributed as dist
    if dist.get_rank() == 0:
        torch.save({{"state": light.state_dict(), "losses": res.losses, "world": res.world_size}}, sys.argv[1])
    dist.destroy_process_group()
    """
)


def test_ddp_two_processes_gloo_matches_single_process(tmp_path):
    """2 processes × batches of 2 images (gloo) == 1 process × batches of the same 4 images."""
    script = tmp_path / "ddp_heal.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         str(script), str(tmp_path / "ddp.pt")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert ddp.returncode == 0, f"torchrun failed:\n{ddp.stdout[-3000:]}\n{ddp.stderr[-3000:]}"
    seconds = time.perf_counter() - t0
    a = torch.load(tmp_path / "ddp.pt", weights_only=True)
    net, light = make_pair()
    data = batches(4)
    single = heal(light, net, [torch.cat(data[i : i + 2]) for i in range(0, 4, 2)], steps=4, lr=1e-2,
                  progress=False)
    assert a["world"] == 2 and single.world_size == 1
    assert a["losses"] == pytest.approx(single.losses, rel=1e-4)
    for k, v in light.state_dict().items():
        diff = float((v.float() - a["state"][k].float()).abs().max())
        assert diff < 1e-5, f"{k}: DDP (2 processes x 2 images) and 1 process (4 images) differ by {diff}"
    print(f"torchrun 2-process run took {seconds:.1f} s")
