"""MAC/param counts: against FlopCounterMode (per module and total), published figures, the design notes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dsrewrite.errors import InputShapeError, PlanError
from dsrewrite.layers import DepthwiseSeparableConv2d
from dsrewrite.macs import (
    count_costs,
    count_params,
    flop_counter_check,
    layer_costs,
    measure,
    region_costs,
)


class Mixed(nn.Module):
    """Grouped, dilated, strided, transposed, 1-d, 3-d convs; a shared conv; a linear on 3-d input."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, stride=2, padding=1)
        self.t1 = nn.ConvTranspose1d(8, 4, 4, stride=2, groups=2, bias=False)
        self.c3 = nn.Conv3d(2, 4, (3, 1, 3), dilation=(1, 1, 2), groups=2)
        self.t3 = nn.ConvTranspose3d(4, 6, 2, stride=(1, 2, 2), dilation=(2, 1, 1))
        self.g = nn.Conv2d(8, 16, 3, groups=4, dilation=2, stride=2, padding=2)
        self.dw = nn.Conv2d(16, 16, 5, groups=16, padding=2, bias=False)
        self.t2 = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1, groups=8)
        self.shared = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        a = self.t1(self.c1(x1))
        b = self.t3(self.c3(x3))
        c = self.shared(self.shared(self.t2(self.dw(self.g(x2)))))  # called twice
        d = self.fc(c.flatten(2).transpose(1, 2))  # (N, HW, 8) -> (N, HW, 10)
        return a.sum() + b.sum() + d.sum()


def _mixed_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 4, 17, generator=g),
        torch.randn(2, 8, 12, 10, generator=g),
        torch.randn(1, 2, 5, 4, 9, generator=g),
    )


class DSModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = DepthwiseSeparableConv2d.from_conv(
            nn.Conv2d(16, 24, 3, stride=2, padding=1), depth_multiplier=2, mid_norm="batchnorm", mid_act="relu"
        )
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def _flop_counter(model: nn.Module, inputs) -> FlopCounterMode:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    return fc


CASES = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), lambda: torch.randn(1, 3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), lambda: torch.randn(2, 3, 64, 64)),
    "mixed": (Mixed, _mixed_inputs),
    "dsconv": (DSModel, lambda: torch.randn(2, 3, 20, 20)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_counts_equal_flop_counter_per_module_and_total(case: str) -> None:
    torch.manual_seed(0)
    make_model, make_input = CASES[case]
    model, x = make_model(), make_input()
    costs = measure(model, x)
    fc = _flop_counter(model, x)
    per_module = fc.get_flop_counts()
    prefix = type(model).__name__
    assert costs.modules, "no conv/linear module was counted"
    for name, cost in costs.modules.items():
        expected = sum(per_module.get(f"{prefix}.{name}", {}).values())
        assert expected % 2 == 0
        assert cost.macs == expected // 2, f"{case}:{name}: hooks {cost.macs} vs FlopCounterMode/2 {expected // 2}"
        assert cost.calls >= 1, f"{case}:{name} did not run"
    assert costs.total_macs == fc.get_total_flops() // 2
    assert costs.check is not None and costs.check.macs == costs.total_macs
    assert costs.check.unaccounted_macs == 0 and costs.check.warning is None, costs.check.warning
    assert costs.total_params == sum(p.numel() for p in model.parameters())


def test_mixed_model_hand_computed_cases() -> None:
    model, x = Mixed(), _mixed_inputs()
    m = measure(model, x, cross_check=False).modules
    # shared 1x1 conv called twice on (2, 8, 12, 10): 2 calls x out.numel() x C_in
    assert m["shared"].calls == 2 and m["shared"].macs == 2 * (2 * 8 * 12 * 10) * 8
    # transposed 1-d: in.numel() x (C_out/groups) x k = (2*8*9) x 2 x 4
    assert m["t1"].input_shape == (2, 8, 9) and m["t1"].macs == 2 * 8 * 9 * 2 * 4
    # grouped dilated strided: out (2,16,6,5) x (8/4) x 9
    assert m["g"].output_shape == (2, 16, 6, 5) and m["g"].macs == 2 * 16 * 6 * 5 * 2 * 9
    # linear on 3-d input: out.numel() x in_features
    assert m["fc"].macs == 2 * 120 * 10 * 8
    assert m["fc"].params == 8 * 10 + 10 and m["dw"].params == 16 * 25


def test_published_torchvision_figures_at_224() -> None:
    """torchvision's model cards: GFLOPS there are GMACs of conv+linear at 224×224."""
    x = torch.randn(1, 3, 224, 224)
    published = {"resnet18": 1.814, "mobilenet_v2": 0.301, "efficientnet_b0": 0.386}
    for name, gmacs in published.items():
        torch.manual_seed(0)
        total = count_costs(torchvision.models.get_model(name, weights=None), x).total_macs
        assert round(total / 1e9, 3) == gmacs, f"{name}: {total / 1e9:.4f} GMACs, published {gmacs}"


def test_published_param_counts_without_forward() -> None:
    published = {"resnet50": 25_557_032, "mobilenet_v2": 3_504_872, "vgg16": 138_357_544}
    for name, params in published.items():
        with torch.device("meta"):  # no memory, no init time: params need no forward
            model = torchvision.models.get_model(name, weights=None)
        assert count_params(model) == params, f"{name}: {count_params(model)} != {params}"


def test_design_note_example_dense_and_separable() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1, bias=False))
    x = torch.randn(1, 64, 56, 56)
    dense = count_costs(model, x)
    assert (dense.total_macs, dense.total_params) == (231_211_008, 73_728)
    assert layer_costs(model, dense, ["0"])["0"].macs == 231_211_008
    sep_model = nn.Sequential(DepthwiseSeparableConv2d.from_conv(model[0]))
    sep = count_costs(sep_model, x)
    assert (sep.total_macs, sep.total_params) == (27_496_448, 8_768)
    lc = layer_costs(sep_model, sep, ["0"])["0"]
    assert (lc.macs, lc.params, lc.flops) == (27_496_448, 8_768, 2 * 27_496_448)
    assert lc.counted_modules == ("0.depthwise", "0.pointwise")


class FunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.inner = nn.Module()
        self.inner.w = nn.Parameter(torch.randn(4, 8, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.conv(x), self.inner.w)


class FunctionalInChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = FunctionalConv()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.proj(y.mean((2, 3))) + F.linear(y.mean((2, 3)), self.proj.weight)


def test_functional_conv_triggers_warning_naming_module() -> None:
    x = torch.randn(1, 3, 10, 10)
    chk = flop_counter_check(FunctionalConv(), x)
    functional = 1 * 4 * 8 * 8 * 8 * 9  # out (1,4,8,8) x C_in 8 x 9
    assert chk.unaccounted_macs == functional
    assert chk.counted_macs == 1 * 8 * 10 * 10 * 27
    assert chk.macs == chk.counted_macs + functional
    assert chk.warning is not None and f"{functional:,} MACs" in chk.warning and "(root)" in chk.warning

    chk2 = flop_counter_check(FunctionalInChild(), x)
    assert chk2.unaccounted_macs == functional + 16
    names = {n for n, _, _ in chk2.unaccounted}
    assert names == {"body", ""}, chk2.unaccounted
    assert "body (convolution" in chk2.warning


def test_model_unchanged_flags_restored_no_hooks_left() -> None:
    torch.manual_seed(0)
    model = DSModel().train()
    model.block.mid_norm.eval()  # a mixed state must come back as it was
    before = copy.deepcopy(model.state_dict())
    flags = {n: m.training for n, m in model.named_modules()}
    measure(model, torch.randn(2, 3, 20, 20))
    assert {n: m.training for n, m in model.named_modules()} == flags
    for k, v in model.state_dict().items():  # BN running stats untouched: forward ran in eval mode
        assert torch.equal(v, before[k]), k
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert torch.is_grad_enabled()


def test_bad_input_raises_input_shape_error_and_restores() -> None:
    model = DSModel().train()
    with pytest.raises(InputShapeError, match=r"DSModel failed to run on example input \(2, 5, 20, 20\)"):
        measure(model, torch.randn(2, 5, 20, 20))
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_layer_costs_unknown_name_suggests() -> None:
    model = DSModel()
    costs = count_costs(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(PlanError, match=r"no submodule 'blok' in DSModel \(did you mean 'block'\?\)"):
        layer_costs(model, costs, ["blok"])


def test_regions_sum_to_totals() -> None:
    model = torchvision.models.resnet18(weights=None)
    costs = count_costs(model, torch.randn(1, 3, 64, 64))
    regions = region_costs(model, costs)
    assert list(regions)[:3] == ["conv1", "bn1", "relu"]
    assert sum(p for p, _ in regions.values()) == costs.total_params
    assert sum(m for _, m in regions.values()) == costs.total_macs
    assert regions["bn1"] == (128, 0) and regions["fc"] == (513_000, 512_000)
