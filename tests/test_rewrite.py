"""End-to-end Python path: plan -> apply -> rewrite on real segmentation and classification models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsrewrite
from dsrewrite.apply import apply_plan
from dsrewrite.errors import PlanError
from dsrewrite.layers import DepthwiseSeparableConv2d
from dsrewrite.planner import NothingSelectedWarning, plan
from dsrewrite.plan_types import Plan

smp = pytest.importorskip("segmentation_models_pytorch")
tv = pytest.importorskip("torchvision")

X64 = (1, 3, 64, 64)


def _x(shape=X64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _out(model, x):
    model.eval()
    with torch.no_grad():
        y = model(x)
    return y["out"] if isinstance(y, dict) else y


def _replaced(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, DepthwiseSeparableConv2d))


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return smp.Unet("resnet18", encoder_weights=None, classes=2).eval()


UNET_DECODER = sorted(f"decoder.blocks.{b}.conv{c}.0" for b in range(5) for c in (1, 2))


def test_decoder_only_on_smp_unet_replaces_exactly_the_decoder(unet):
    before = copy.deepcopy(unet)
    out = dsrewrite.rewrite(unet, "decoder_only", example_inputs=_x())
    assert type(out) is type(unet)  # the model's own class, not a GraphModule
    assert _replaced(out) == UNET_DECODER
    assert not any(n.startswith(("encoder", "segmentation_head")) for n in _replaced(out))
    y, y0 = _out(out, _x()), _out(unet, _x())
    assert y.shape == y0.shape and torch.isfinite(y).all()
    assert _state_equal(unet, before), "the caller's model changed"
    assert _replaced(unet) == []


def test_post_concat_finds_the_four_skip_convs(unet):
    p = plan(unet, "post_concat", _x())
    assert sorted(e.name for e in p.replaced) == [f"decoder.blocks.{b}.conv1.0" for b in range(4)]
    assert p.capture == "fx"


def test_all_3x3_leaves_stem_and_head_alone(unet):
    p = plan(unet, "all_3x3", _x())
    names = {e.name for e in p.replaced}
    assert "encoder.conv1" not in names and "segmentation_head.0" not in names
    assert set(UNET_DECODER) <= names
    assert any(n.startswith("encoder.layer") for n in names)
    reasons = {e.name: e.reason for e in p.entries}
    assert reasons["encoder.conv1"] and reasons["segmentation_head.0"]


def test_every_candidate_is_replaced_or_has_a_reason(unet):
    p = plan(unet, "decoder_only", _x())
    convs = [n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d)]
    assert [e.name for e in p.entries] == convs
    assert all(e.reason.strip() for e in p.entries)


@pytest.mark.parametrize("recipe", ["decoder_only", "all_3x3"])
def test_full_rank_reproduces_unet(unet, recipe):
    out = dsrewrite.rewrite(unet, recipe, example_inputs=_x(), depth_multiplier=9)
    err = _rel(_out(out, _x(seed=1)), _out(unet, _x(seed=1)))
    assert err < 1e-4, f"relative error {err:.3e}"


def test_low_rank_moves_outputs_but_stays_finite(unet):
    out = dsrewrite.rewrite(unet, "decoder_only", example_inputs=_x())
    err = _rel(_out(out, _x(seed=1)), _out(unet, _x(seed=1)))
    assert 0 < err < 10


def test_plan_round_trips_and_reapplies_to_a_fresh_instance(unet):
    p = plan(unet, "decoder_only", _x(), order="auto")
    p2 = Plan.from_json(p.to_json())
    assert p2 == p
    a = apply_plan(unet, p)
    torch.manual_seed(0)
    fresh = smp.Unet("resnet18", encoder_weights=None, classes=2).eval()
    b = apply_plan(fresh, p2, init="random")
    b.load_state_dict(a.state_dict())
    assert torch.equal(_out(a, _x()), _out(b, _x()))


def test_auto_order_prefers_pw_dw_after_concat_by_macs(unet):
    p = plan(unet, "decoder_only", _x(), order="auto")
    cfg = {e.name: e.config for e in p.replaced}
    # decoder.blocks.0.conv1: C_in = 256 + 512 skip... (768) > C_out 256: pointwise first is cheaper
    assert cfg["decoder.blocks.0.conv1.0"].order == "pw_dw"
    assert "fewer MACs" in cfg["decoder.blocks.0.conv1.0"].note


def test_inplace_mutates_and_returns_same_object(unet):
    m = copy.deepcopy(unet)
    out = dsrewrite.rewrite(m, "decoder_only", example_inputs=_x(), inplace=True)
    assert out is m and _replaced(m) == UNET_DECODER


@pytest.mark.parametrize("dtype", [torch.float64])
def test_keeps_dtype_and_train_mode(unet, dtype):
    m = copy.deepcopy(unet).to(dtype).train()
    out = dsrewrite.rewrite(m, "decoder_only", example_inputs=_x().to(dtype))
    assert out.training and all(mod.training for mod in out.modules())
    assert all(p.dtype == dtype for p in out.parameters())
    assert m.training  # capture restored the caller's mode


def test_plan_for_another_architecture_is_refused(unet):
    p = plan(unet, "decoder_only", _x())
    other = tv.models.resnet18(weights=None)
    before = copy.deepcopy(other)
    with pytest.raises(PlanError, match="names no module"):
        apply_plan(other, p)
    assert _state_equal(other, before)


def test_nothing_selected_warns_in_the_api():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU())
    with pytest.warns(NothingSelectedWarning, match="selects no conv"):
        out = dsrewrite.rewrite(net, "all_3x3", example_inputs=torch.randn(1, 3, 8, 8))
    assert _replaced(out) == []


def test_rewrite_and_report_gives_plan_and_report(unet):
    res = dsrewrite.rewrite_and_report(unet, "decoder_only", example_inputs=_x())
    assert [e.name for e in res.plan.replaced] == UNET_DECODER
    d = res.report.to_dict()
    assert d["totals"]["after"]["macs"] < d["totals"]["before"]["macs"]


class _PlainUNet(nn.Module):
    """A U-Net with no telling names: the decoder must be found through the graph."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU())
        self.d = nn.Sequential(nn.Conv2d(64 + 32, 32, 3, padding=1), nn.ReLU())
        self.e = nn.Sequential(nn.Conv2d(32 + 16, 16, 3, padding=1), nn.ReLU())
        self.f = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        x1 = self.a(x)
        x2 = self.b(x1)
        x3 = self.c(x2)
        y = self.d(torch.cat([F.interpolate(x3, scale_factor=2.0), x2], 1))
        y = self.e(torch.cat([F.interpolate(y, scale_factor=2.0), x1], 1))
        return self.f(y)


def test_decoder_only_finds_an_unnamed_decoder_through_the_graph():
    torch.manual_seed(0)
    net = _PlainUNet().eval()
    p = plan(net, "decoder_only", torch.randn(1, 3, 32, 32))
    assert sorted(e.name for e in p.replaced) == ["d.0", "e.0"]
    out = dsrewrite.rewrite(net, "decoder_only", example_inputs=torch.randn(1, 3, 32, 32), depth_multiplier=9)
    x = torch.randn(1, 3, 32, 32)
    err = _rel(_out(out, x), _out(net, x))
    assert err < 1e-5, f"relative error {err:.3e}"


@pytest.mark.parametrize("factory", ["fcn_resnet50", "deeplabv3_resnet50"])
def test_torchvision_segmentation_heads(factory):
    torch.manual_seed(0)
    net = getattr(tv.models.segmentation, factory)(weights=None, weights_backbone=None).eval()
    p = plan(net, "decoder_only", _x())
    names = sorted(e.name for e in p.replaced)
    heads = sorted(
        n for n, m in net.named_modules()
        if n.startswith("classifier") and isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1
    )
    assert names == heads and names, names
    out = apply_plan(net, plan(net, "decoder_only", _x(), depth_multiplier=9))
    err = _rel(_out(out, _x(seed=1)), _out(net, _x(seed=1)))
    assert err < 1e-4, f"relative error {err:.3e}"


@pytest.mark.slow
def test_unetplusplus_through_export_fallback():
    torch.manual_seed(0)
    net = smp.UnetPlusPlus("resnet18", encoder_weights=None, classes=2).eval()
    p = plan(net, "decoder_only", _x())
    assert p.capture == "export"
    expected = sorted(
        n for n, m in net.named_modules()
        if n.startswith("decoder") and isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
        and m.in_channels >= 16 and m.out_channels >= 16
    )
    assert sorted(e.name for e in p.replaced) == expected
    out = apply_plan(net, plan(net, "decoder_only", _x(), depth_multiplier=9))
    assert type(out) is type(net)
    err = _rel(_out(out, _x(seed=1)), _out(net, _x(seed=1)))
    assert err < 1e-4, f"relative error {err:.3e}"


@pytest.mark.slow
def test_timm_tf_same_padding_model():
    """timm tf_* models: plain fx fails on their SAME padding, but dsrewrite keeps every conv
    subclass as a leaf, so fx works; Conv2dSame (own forward) is skipped, never swapped as a plain conv."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("tf_efficientnetv2_b0", pretrained=False).eval()
    p = plan(net, "all_3x3", _x())
    assert p.capture in ("fx", "export")
    replaced = {e.name for e in p.replaced}
    reasons = {e.name: e.reason for e in p.entries}
    same = [n for n, m in net.named_modules() if type(m).__name__ == "Conv2dSame"]
    assert same and not (set(same) & replaced)
    assert all("own forward" in reasons[n] for n in same)
    assert replaced == {"blocks.0.0.conv", "blocks.1.1.conv_exp", "blocks.2.1.conv_exp"}
    out = apply_plan(net, plan(net, "all_3x3", _x(), depth_multiplier=9))
    err = _rel(_out(out, _x(seed=1)), _out(net, _x(seed=1)))
    assert err < 1e-4, f"relative error {err:.3e}"
