"""Hoisting the pointwise stage of pw_dw blocks above the upsample: exactness, structure, declines."""

from __future__ import annotations

import copy
from typing import Optional

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from dsrewrite.capture import capture
from dsrewrite.deploy import fold_batchnorm, prepare_for_deployment
from dsrewrite.hoist import HoistRecord, hoist_pointwise
from dsrewrite.layers import DepthwiseSeparableConv2d
from dsrewrite.macs import count_costs

CATS = (torch.cat, torch.concat, torch.concatenate)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights everywhere and non-trivial BN statistics (fresh BNs are identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model


class ToyBlock(nn.Module):
    """smp-like decoder block: up → cat → Identity → Sequential(separable block, BN, ReLU)."""

    def __init__(self, c_x: int = 6, c_skip: int = 4, c_out: int = 5, *, mode: str = "nearest",
                 align_corners: Optional[bool] = None, skip_first: bool = False, order: str = "pw_dw",
                 depth_multiplier: int = 1, mid_norm: Optional[str] = None, mid_act: Optional[str] = None):
        super().__init__()
        self.mode, self.align_corners, self.skip_first = mode, align_corners, skip_first
        block = DepthwiseSeparableConv2d(c_x + c_skip, c_out, 3, padding=1, order=order,
                                         depth_multiplier=depth_multiplier, mid_norm=mid_norm, mid_act=mid_act)
        self.conv1 = nn.Sequential(block, nn.BatchNorm2d(c_out), nn.ReLU())
        self.attention = nn.Identity()

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode=self.mode, align_corners=self.align_corners)
        if skip is not None:
            x = torch.cat([skip, x] if self.skip_first else [x, skip], dim=1)
            x = self.attention(x)
        return self.conv1(x)


class Net(nn.Module):
    """A parent whose class must survive the rewrite; it calls its block by keyword like smp does."""

    def __init__(self, block: nn.Module, with_skip: bool = True):
        super().__init__()
        self.block, self.with_skip = block, with_skip
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x, skip=skip if self.with_skip else None))


def toy(seed: int = 0, dtype: torch.dtype = torch.float64, with_skip: bool = True, **kw) -> Net:
    torch.manual_seed(seed)
    return randomise(Net(ToyBlock(**kw), with_skip), seed).to(dtype).eval()


def toy_inputs(dtype: torch.dtype = torch.float64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, 32, 32, generator=g).to(dtype), torch.randn(2, 4, 64, 64, generator=g).to(dtype)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def cat_nodes(gm: torch.fx.GraphModule) -> int:
    return sum(n.op == "call_function" and n.target in CATS for n in gm.graph.nodes)


def graph_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.fx.GraphModule)]


# --------------------------------------------------------------------------------------
# Exactness and structure
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    {},
    {"skip_first": True},
    {"mode": "bilinear", "align_corners": False},
    {"mode": "bilinear", "align_corners": True, "depth_multiplier": 3},
    {"mid_norm": "batchnorm", "mid_act": "relu6", "depth_multiplier": 2},
])
def test_toy_block_matches_in_float64_and_loses_its_cat(kw: dict) -> None:
    net, (x, skip) = toy(**kw), toy_inputs()
    with torch.no_grad():
        ref = net(x, skip)
    out, records = hoist_pointwise(net, (x, skip))
    with torch.no_grad():
        got = out(x, skip)
    err = max_err(got, ref)
    assert err < 1e-10, f"max |hoisted − original| = {err:.3g} (float64) for {kw}"
    assert type(out) is Net and graph_modules(out) == ["block"], graph_modules(out)
    assert cat_nodes(out.block) == 0, out.block.graph
    assert [(r.conv, r.hoisted, r.concat, r.hoisted_channels, r.other_channels) for r in records] == [
        ("block.conv1.0", True, True, 6, 4)
    ], records
    # the pointwise on the upsampled tensor now reads the low-resolution input
    pw_inputs = {n.args[0].name for n in out.block.graph.nodes if n.op == "call_module" and "pointwise" in n.target}
    assert pw_inputs == {"x", "skip"}, pw_inputs


def test_macs_saved_formula_and_count_costs_agree() -> None:
    net, (x, skip) = toy(depth_multiplier=2), toy_inputs()
    out, records = hoist_pointwise(net, (x, skip))
    n, c_x, mid = 2, 6, 2 * 5
    expected = n * c_x * mid * (64 * 64 - 32 * 32)
    assert records[0].mid_channels == mid and records[0].macs_saved == expected, records
    before, after = count_costs(net, (x, skip)).total_macs, count_costs(out, (x, skip)).total_macs
    assert before - after == expected, (before, after, expected)


def test_no_concat_and_none_argument_specialised() -> None:
    """The block is called with skip=None (smp's last block): up → pw_dw hoisted, the None pinned."""
    net, (x, skip) = toy(with_skip=False, c_skip=0), toy_inputs()
    with torch.no_grad():
        ref = net(x, skip)
    out, records = hoist_pointwise(net, (x, skip))
    with torch.no_grad():
        err = max_err(out(x, skip), ref)
    assert err < 1e-10, f"max error {err:.3g}"
    assert [(r.hoisted, r.concat, r.hoisted_channels) for r in records] == [(True, False, 6)], records
    with pytest.raises(AssertionError, match="specialized"):
        out.block(x, skip=skip)


def test_after_fold_batchnorm_and_channels_last() -> None:
    """Folding the mid BN puts a bias on the pointwise stage; NHWC weights and inputs still match."""
    net = toy(dtype=torch.float32, mid_norm="batchnorm", depth_multiplier=2)
    x, skip = toy_inputs(torch.float32)
    with torch.no_grad():
        ref = net(x, skip)
    folded = fold_batchnorm(net)
    assert folded.block.conv1[0].pointwise.bias is not None
    cl = folded.to(memory_format=torch.channels_last)
    xs = (x.contiguous(memory_format=torch.channels_last), skip.contiguous(memory_format=torch.channels_last))
    out, records = hoist_pointwise(cl, xs)
    assert [r.hoisted for r in records] == [True], records
    with torch.no_grad():
        got = out(*xs)
    err = max_err(got, ref)
    assert err < 1e-4 * ref.abs().max().item() + 1e-5, f"max error {err:.3g} (float32, channels_last)"
    # the hoisted graph folds further (its BN after the depthwise) and stays exact
    refolded = fold_batchnorm(out)
    with torch.no_grad():
        err2 = max_err(refolded(*xs), ref)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in refolded.modules())
    assert err2 < 1e-4 * ref.abs().max().item() + 1e-5, f"max error after refolding {err2:.3g}"


# --------------------------------------------------------------------------------------
# The smp U-Net
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet():
    smp = pytest.importorskip("segmentation_models_pytorch")
    from dsrewrite import rewrite

    torch.manual_seed(0)
    dense = smp.Unet("resnet18", encoder_weights=None).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    light = rewrite(dense, "decoder_only", example_inputs=x, order="auto")
    return dense, light, x


def test_smp_unet_hoists_every_pw_dw_block_after_an_upsample(unet) -> None:
    dense, light, x = unet
    facts = capture(dense, x).by_name()
    expected = sorted(
        name for name, m in light.named_modules()
        if isinstance(m, DepthwiseSeparableConv2d) and m.order == "pw_dw" and facts[name].after_upsample
    )
    assert expected, "the rewritten U-Net has no pw_dw block after an upsample: the test would prove nothing"
    with torch.no_grad():
        ref = light(x)
    out, records = hoist_pointwise(light, x)
    with torch.no_grad():
        got = out(x)
    err = max_err(got, ref)
    print(f"smp Unet-resnet18 hoisted: max |Δ| = {err:.3g} (max |ref| = {ref.abs().max().item():.3g})")
    assert err < 1e-4 * ref.abs().max().item() + 1e-5, f"max error {err:.3g}"
    assert sorted(r.conv for r in records if r.hoisted) == expected, records
    assert type(out) is type(light)
    assert all(type(out.decoder.blocks[i]).__name__ == "HoistedUnetDecoderBlock" for i in range(5))
    assert all(cat_nodes(out.decoder.blocks[i]) == 0 for i in range(5))
    before, after = count_costs(light, x).total_macs, count_costs(out, x).total_macs
    assert after < before and before - after == sum(r.macs_saved for r in records), (before, after, records)


def test_smp_unet_deployment_form_channels_last(unet) -> None:
    _, light, x = unet
    dep = prepare_for_deployment(light, x, hoist=False)
    xc = x.contiguous(memory_format=torch.channels_last)
    out, records = hoist_pointwise(dep, xc)
    assert sum(r.hoisted for r in records) == 5, records
    with torch.no_grad():
        ref, got = light(x), out(xc)
    err = max_err(got, ref)
    print(f"deployed (BN folded, channels_last) + hoisted vs original: max |Δ| = {err:.3g}")
    assert err < 1e-4 * ref.abs().max().item() + 1e-5, f"max error {err:.3g}"


# --------------------------------------------------------------------------------------
# Declines: output identical, nothing inserted, a reason given
# --------------------------------------------------------------------------------------
class SecondUser(ToyBlock):
    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=2, mode=self.mode)
        return self.conv1(self.attention(torch.cat([up, skip], dim=1))) + up[:, :5]


class CatOnBatch(ToyBlock):
    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=2, mode=self.mode)
        mirrored = F.interpolate(x.flip(-1), scale_factor=2, mode=self.mode)
        return self.conv1(torch.cat([up, mirrored], dim=0))[: x.shape[0]]


def declined(kind: str) -> Net:
    if kind == "dw_pw":
        return toy(order="dw_pw")
    if kind == "bicubic":
        return toy(mode="bicubic", align_corners=False)
    if kind == "second_user":
        net = toy()
        net.block.__class__ = SecondUser
        return net
    if kind == "cat_dim":
        net = toy(c_x=6, c_skip=0)
        net.block.__class__ = CatOnBatch
        return net
    net = toy()
    block = net.block.conv1[0]
    if kind == "grouped_pw":
        block.pointwise = nn.Conv2d(10, 5, 1, groups=5, bias=False).double()
    elif kind == "hook":
        block.register_forward_hook(lambda m, i, o: None)
    elif kind == "shared":
        net.spare = block
    return net


@pytest.mark.parametrize("kind, words", [
    ("dw_pw", "order 'dw_pw'"),
    ("bicubic", "'bicubic'"),
    ("second_user", "2 users"),
    ("cat_dim", "dim=0"),
    ("grouped_pw", "groups=5"),
    ("hook", "hooks"),
    ("shared", "shared"),
])
def test_declined_patterns_leave_the_model_alone(kind: str, words: str) -> None:
    net, (x, skip) = declined(kind), toy_inputs()
    with torch.no_grad():
        ref = net(x, skip)
    out, records = hoist_pointwise(net, (x, skip))
    with torch.no_grad():
        got = out(x, skip)
    assert torch.equal(got, ref), f"declined rewrite changed the output by {max_err(got, ref):.3g}"
    assert graph_modules(out) == [], graph_modules(out)
    assert len(records) == 1 and not records[0].hoisted and words in records[0].reason, records
    assert records[0].conv == "block.conv1.0"


def test_inplace_false_leaves_the_input_unchanged_and_inplace_true_rewrites_it() -> None:
    net, (x, skip) = toy(), toy_inputs()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    types = [(n, type(m)) for n, m in net.named_modules()]
    out, records = hoist_pointwise(net, (x, skip))
    assert out is not net and records and records[0].hoisted
    assert [(n, type(m)) for n, m in net.named_modules()] == types
    now = net.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    same, _ = hoist_pointwise(net, (x, skip), inplace=True)
    assert same is net and graph_modules(net) == ["block"]


def test_records_are_plain_values() -> None:
    r = HoistRecord("a", "a.conv", False, "why")
    assert r == HoistRecord("a", "a.conv", False, "why") and r.macs_saved == 0
    with pytest.raises(Exception):
        r.reason = "other"  # type: ignore[misc]


class TwoUps(nn.Module):
    """Two upsampled inputs (an nn.Upsample module and F.interpolate ×4) around a skip; the
    pointwise carries a bias (as after folding a mid BN)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.conv = DepthwiseSeparableConv2d(9, 4, 3, padding=1, order="pw_dw", depth_multiplier=2)
        self.conv.pointwise.bias = nn.Parameter(torch.zeros(8))

    def forward(self, a: torch.Tensor, b: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(a), skip, F.interpolate(b, scale_factor=4.0)], dim=1))


def test_several_upsampled_inputs_and_a_pointwise_bias() -> None:
    net = randomise(TwoUps()).double().eval()
    g = torch.Generator().manual_seed(3)
    a, b, skip = (torch.randn(*s, generator=g, dtype=torch.float64) for s in
                  ((1, 3, 16, 16), (1, 2, 8, 8), (1, 4, 32, 32)))
    with torch.no_grad():
        ref = net(a, b, skip)
    out, records = hoist_pointwise(net, (a, b, skip))
    with torch.no_grad():
        err = max_err(out(a, b, skip), ref)
    assert err < 1e-10, f"max error {err:.3g} (float64)"
    (r,) = records
    assert (r.hoisted, r.hoisted_channels, r.other_channels, r.mid_channels) == (True, 5, 4, 8), r
    assert r.macs_saved == 3 * 8 * (32 * 32 - 16 * 16) + 2 * 8 * (32 * 32 - 8 * 8), r
    biases = [m.bias is not None for n, m in out.named_modules() if "pointwise_part" in n]
    assert biases == [False, True, False], biases  # the bias sits on the skip's part only


def test_a_rewrite_that_would_change_the_output_is_declined(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-module check on the example input is the safety net: a wrong split is caught."""
    import dsrewrite.deploy.hoist as hoist

    real = hoist._split_pointwise

    def wrong(pw: nn.Conv2d, start: int, stop: int, bias: bool) -> nn.Conv2d:
        new = real(pw, start, stop, bias)
        with torch.no_grad():
            new.weight.mul_(1.01)
        return new

    monkeypatch.setattr(hoist, "_split_pointwise", wrong)
    net, (x, skip) = toy(), toy_inputs()
    with torch.no_grad():
        ref = net(x, skip)
    out, records = hoist_pointwise(net, (x, skip))
    with torch.no_grad():
        assert torch.equal(out(x, skip), ref)
    assert graph_modules(out) == [] and [r.hoisted for r in records] == [False], records
    assert "differs from the original" in records[0].reason, records
