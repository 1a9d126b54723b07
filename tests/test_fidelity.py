"""compare_outputs: exactness at m = k², aggregation over batches, structures, argmax agreement, negatives."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dsrewrite.fidelity import FidelityError, compare_outputs, flatten_outputs
from dsrewrite.layers import DepthwiseSeparableConv2d


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 5, 3, padding=1))


def _separable(net: nn.Sequential, m: int) -> nn.Sequential:
    out = nn.Sequential(*[DepthwiseSeparableConv2d.from_conv(l, depth_multiplier=m) if isinstance(l, nn.Conv2d) else l for l in net])
    return out


class AddOffset(nn.Module):
    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


def test_identical_models_are_exact() -> None:
    net = _net()
    fid = compare_outputs(net, net, torch.randn(2, 3, 16, 16))
    assert (fid.rel_l2, fid.cosine, fid.max_abs, fid.argmax_agreement, fid.batches) == (0.0, 1.0, 0.0, 1.0, 1)


def test_full_rank_exact_rank_one_not() -> None:
    net = _net()
    x = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    exact = compare_outputs(net, _separable(net, 9), x)
    assert exact.rel_l2 < 1e-5, f"m=9 rel L2 {exact.rel_l2:.3e}, max abs {exact.max_abs:.3e}"
    assert exact.cosine > 1 - 1e-9 and exact.argmax_agreement == 1.0 and exact.batches == 2
    lossy = compare_outputs(net, _separable(net, 1), x)
    assert lossy.rel_l2 > 1e-3, f"m=1 rel L2 {lossy.rel_l2:.3e}"
    assert lossy.cosine < 1.0


def test_batches_aggregate_sums_not_mean_of_ratios() -> None:
    big = torch.full((1, 4), 10.0)
    small = torch.full((1, 4), 0.5)
    fid = compare_outputs(nn.Identity(), AddOffset(1.0), [big, small])
    # float64 reference: sqrt(Σ‖err‖² / Σ‖a‖²) over both batches
    expected = math.sqrt((4 * 1.0 + 4 * 1.0) / (4 * 100.0 + 4 * 0.25))
    mean_of_ratios = (0.1 + 2.0) / 2
    assert abs(fid.rel_l2 - expected) < 1e-12, f"rel L2 {fid.rel_l2!r} vs {expected!r}"
    assert abs(fid.rel_l2 - mean_of_ratios) > 0.5
    dot = 4 * 10 * 11 + 4 * 0.5 * 1.5
    cos = dot / math.sqrt((400 + 1) * (4 * 121 + 4 * 2.25))
    assert abs(fid.cosine - cos) < 1e-12 and fid.max_abs == 1.0 and fid.argmax_agreement is None


class AddNoise(nn.Module):
    def __init__(self, noise: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("noise", noise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.noise


def test_float64_accumulation() -> None:
    # tiny differences on large values: float32 arithmetic is off by ~2e-8 relative here
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1_000_000, generator=g) * 1e3 + 1e4
    noisy = AddNoise(torch.randn(1, 1_000_000, generator=g) * 1e-2)
    fid = compare_outputs(nn.Identity(), noisy, x)
    a, b = x.double(), (x + noisy.noise).double()
    expected = float((a - b).norm() / a.norm())
    assert abs(fid.rel_l2 - expected) / expected < 1e-10, f"{fid.rel_l2!r} vs float64 reference {expected!r}"


class DictOut(nn.Module):
    def __init__(self, swap: bool = False) -> None:
        super().__init__()
        self.swap = swap

    def forward(self, x: torch.Tensor) -> dict:
        logits = torch.stack([x, -x], dim=1)  # (N, 2, H, W): argmax is the sign of x
        if self.swap:  # flip the class for the left half of the pixels
            w = x.shape[-1] // 2
            logits = torch.cat([logits[..., :w].flip(1), logits[..., w:]], dim=-1)
        return {"out": logits, "aux": (x.mean(), None)}


def test_dict_outputs_ordered_and_argmax_agreement() -> None:
    x = torch.randn(3, 8, 10, generator=torch.Generator().manual_seed(1))
    fid = compare_outputs(DictOut(), DictOut(swap=True), x)
    assert [o.path for o in fid.outputs] == ["out", "aux[0]"]  # the model's order
    assert fid.outputs[0].argmax_agreement == 0.5 and fid.argmax_agreement == 0.5
    assert fid.outputs[1].rel_l2 == 0.0 and fid.outputs[1].argmax_agreement is None
    assert fid.to_dict()["outputs"][0]["shape"] == [3, 2, 8, 10]
    assert [(n.path, n.why) for n in fid.not_compared] == [("aux[1]", "None, not a tensor")]


class Stack(nn.Module):
    """(N, 2, *spatial) logits whose argmax is the sign of x; ``swap`` flips it where the last coordinate is in the left half."""

    def __init__(self, swap: bool = False) -> None:
        super().__init__()
        self.swap = swap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([x, -x], dim=1)
        if self.swap:
            w = x.shape[-1] // 2
            logits = torch.cat([logits[..., :w].flip(1), logits[..., w:]], dim=-1)
        return logits


def test_argmax_agreement_on_volumes_and_not_on_sequences() -> None:
    # a 3-D segmentation output (N, C, D, H, W) is counted voxel by voxel, as a 2-D one is pixel by pixel
    g = torch.Generator().manual_seed(2)
    vol = compare_outputs(Stack(), Stack(swap=True), torch.randn(2, 3, 4, 6, generator=g))
    assert vol.outputs[0].shape == (2, 2, 3, 4, 6)
    assert vol.argmax_agreement == 0.5, f"argmax agreement on a volume: {vol.argmax_agreement!r}"
    # (N, C, L) is ambiguous (channels first or last): not counted
    seq = compare_outputs(Stack(), Stack(swap=True), torch.randn(2, 6, generator=g))
    assert seq.argmax_agreement is None


def test_generator_of_batches_and_tuple_args() -> None:
    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple:
            return a + b, a * b

    gen = ((torch.ones(2, 3) * i, torch.ones(2, 3)) for i in range(3))
    fid = compare_outputs(Two(), Two(), gen)
    assert fid.batches == 3 and [o.path for o in fid.outputs] == ["[0]", "[1]"]


def test_flags_restored() -> None:
    net = _net().train()
    net[0].eval()
    other = _separable(net, 2).train()
    compare_outputs(net, other, torch.randn(1, 3, 8, 8))
    assert net.training and not net[0].training and net[2].training
    assert all(m.training for m in other.modules())


def test_structure_and_shape_mismatch_reported_not_raised() -> None:
    x = torch.randn(2, 4, 6)
    fid = compare_outputs(DictOut(), nn.Identity(), x)
    assert fid.rel_l2 is None and fid.cosine is None and fid.outputs == ()
    assert [n.why for n in fid.not_compared] == ["a dict vs a tensor of shape (2, 4, 6)"]
    fid = compare_outputs(nn.Identity(), nn.AvgPool1d(2), x)
    assert fid.rel_l2 is None and fid.not_compared[0].why == "shape (2, 4, 6) vs (2, 4, 3)"
    assert fid.not_compared[0].mismatch
    with pytest.raises(FidelityError, match="was empty"):
        compare_outputs(nn.Identity(), nn.Identity(), [])


def test_flatten_outputs_paths() -> None:
    t = torch.zeros(1)
    paths = [p for p, _ in flatten_outputs([{"b": t, "a": [t, t]}, t])]
    assert paths == ["[0].a[0]", "[0].a[1]", "[0].b", "[1]"]
