"""DepthwiseSeparableConv2d: exactness, structure, negatives, preservation, training."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dsrewrite.errors import UnsupportedConvError
from dsrewrite.layers import DepthwiseSeparableConv2d

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@st.composite
def conv_cases(draw):
    kernel = draw(st.sampled_from([(1, 3), (3, 3), (5, 5), (3, 5)]))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    form = draw(st.sampled_from(["int", "tuple", "same", "valid"] if stride == 1 else ["int", "tuple", "valid"]))
    if form == "int":
        padding = draw(st.integers(0, 2))
    elif form == "tuple":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    else:
        padding = form
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    h = draw(st.integers(11, 14))  # odd and even; large enough for reflect padding
    w = draw(st.integers(11, 14))
    cin = draw(st.integers(1, 6))
    cout = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    order = draw(st.sampled_from(["dw_pw", "pw_dw"]))
    seed = draw(st.integers(0, 2**16))
    return dict(kernel=kernel, stride=stride, dilation=dilation, padding=padding, padding_mode=padding_mode,
                bias=bias, h=h, w=w, cin=cin, cout=cout, dtype=dtype, order=order, seed=seed)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_full_rank_reproduces_dense_conv(case):
    torch.manual_seed(case["seed"])
    dense = nn.Conv2d(
        case["cin"], case["cout"], case["kernel"], stride=case["stride"], padding=case["padding"],
        dilation=case["dilation"], bias=case["bias"], padding_mode=case["padding_mode"], dtype=case["dtype"],
    )
    m = case["kernel"][0] * case["kernel"][1]
    sep = DepthwiseSeparableConv2d.from_conv(dense, depth_multiplier=m, order=case["order"])
    x = torch.randn(2, case["cin"], case["h"], case["w"], dtype=case["dtype"])
    with torch.no_grad():
        ref, out = dense(x), sep(x)
    assert out.shape == ref.shape
    err = rel_err(out, ref)
    assert err < TOL[case["dtype"]], f"relative error {err:.3e} for {case}"


def test_hyperparameters_are_copied():
    dense = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False,
                      padding_mode="reflect")
    for order in ("dw_pw", "pw_dw"):
        sep = DepthwiseSeparableConv2d.from_conv(dense, order=order)
        assert sep.kernel_size == (3, 5) and sep.stride == (2, 1)
        assert sep.padding == (1, 2) and sep.dilation == (1, 2) and sep.padding_mode == "reflect"
        assert sep.in_channels == 4 and sep.out_channels == 6 and sep.bias is None
        assert sep.pointwise.kernel_size == (1, 1) and sep.pointwise.stride == (1, 1)
    same = DepthwiseSeparableConv2d.from_conv(nn.Conv2d(4, 6, 3, padding="same"))
    assert same.padding == "same"


@pytest.mark.parametrize("cin,cout,m", [(32, 64, 1), (64, 128, 1), (16, 24, 3), (8, 5, 9)])
def test_structure_and_parameter_counts(cin, cout, m):
    k2 = 9
    for bias in (False, True):
        dense = nn.Conv2d(cin, cout, 3, bias=bias)
        dw = DepthwiseSeparableConv2d.from_conv(dense, depth_multiplier=m, order="dw_pw")
        assert dw.depthwise.groups == cin
        assert dw.depthwise.out_channels == m * cin
        n = sum(p.numel() for p in dw.parameters())
        assert n == k2 * cin * m + m * cin * cout + (cout if bias else 0)
        pw = DepthwiseSeparableConv2d.from_conv(dense, depth_multiplier=m, order="pw_dw")
        assert pw.depthwise.groups == cout and pw.pointwise.out_channels == m * cout
        n = sum(p.numel() for p in pw.parameters())
        assert n == cin * m * cout + k2 * m * cout + (cout if bias else 0)


def test_design_notes_worked_examples():
    """001 design note: Conv2d(32,64,3) 18,432 -> 2,336; Conv2d(64,128,3,bias=False) 73,728 -> 8,768."""
    def count(mod):
        return sum(p.numel() for p in mod.parameters())

    a = nn.Conv2d(32, 64, 3, bias=False)
    assert (count(a), count(DepthwiseSeparableConv2d.from_conv(a))) == (18_432, 2_336)
    b = nn.Conv2d(64, 128, 3, bias=False)
    assert (count(b), count(DepthwiseSeparableConv2d.from_conv(b))) == (73_728, 8_768)


def test_state_dict_keys_are_stable():
    dense = nn.Conv2d(4, 6, 3)
    assert sorted(DepthwiseSeparableConv2d.from_conv(dense).state_dict()) == [
        "depthwise.weight", "pointwise.bias", "pointwise.weight"]
    assert sorted(DepthwiseSeparableConv2d.from_conv(dense, order="pw_dw").state_dict()) == [
        "depthwise.bias", "depthwise.weight", "pointwise.weight"]
    keys = DepthwiseSeparableConv2d.from_conv(dense, mid_norm="batchnorm", mid_act="relu6").state_dict()
    assert "mid_norm.weight" in keys and "mid_norm.running_var" in keys


def test_mobilenet_block_of_the_design_notes():
    blk = DepthwiseSeparableConv2d(32, 64, 3, padding=1, bias=False, mid_norm="batchnorm", mid_act="relu6")
    assert isinstance(blk.mid_norm, nn.BatchNorm2d) and isinstance(blk.mid_act, nn.ReLU6)
    assert not blk.is_linear
    assert blk(torch.randn(2, 32, 8, 8)).shape == (2, 64, 8, 8)


def test_low_rank_output_error_matches_weight_error_direction():
    """At m=1 the block is an approximation: error strictly between 0 and the output norm."""
    torch.manual_seed(0)
    dense = nn.Conv2d(16, 16, 3, padding=1)
    sep = DepthwiseSeparableConv2d.from_conv(dense)
    x = torch.randn(1, 16, 12, 12)
    with torch.no_grad():
        err = rel_err(sep(x), dense(x))
    assert 0.01 < err < 1.0, f"relative error {err:.3e}"


@pytest.mark.parametrize(
    "conv,match",
    [
        (nn.Conv2d(8, 8, 3, groups=2), "grouped"),
        (nn.Conv2d(8, 8, 3, groups=8), "grouped"),
        (nn.Conv2d(8, 16, 1), "1×1"),
        (nn.Conv1d(8, 8, 3), "not an nn.Conv2d"),
        (nn.Conv3d(8, 8, 3), "not an nn.Conv2d"),
        (nn.ConvTranspose2d(8, 8, 3), "not an nn.Conv2d"),
    ],
)
def test_refuses_what_cannot_be_represented(conv, match):
    before = copy.deepcopy(conv.state_dict())
    with pytest.raises(UnsupportedConvError, match=match):
        DepthwiseSeparableConv2d.from_conv(conv, name="decoder.x")
    assert all(torch.equal(before[k], v) for k, v in conv.state_dict().items())


def test_refuses_conv_subclass_with_own_forward():
    class SameConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))

    with pytest.raises(UnsupportedConvError, match="own forward"):
        DepthwiseSeparableConv2d.from_conv(SameConv(8, 8, 3), name="stem.conv")


def test_error_names_the_module():
    with pytest.raises(UnsupportedConvError, match="'encoder.layer1.0'"):
        DepthwiseSeparableConv2d.from_conv(nn.Conv2d(8, 8, 3, groups=8), name="encoder.layer1.0")


def test_meta_device_svd_refused_random_ok():
    conv = nn.Conv2d(8, 8, 3, device="meta")
    with pytest.raises(UnsupportedConvError, match="meta"):
        DepthwiseSeparableConv2d.from_conv(conv)
    blk = DepthwiseSeparableConv2d.from_conv(conv, init="random")
    assert blk.depthwise.weight.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_preserves_device_dtype_requires_grad_and_mode(dtype):
    dense = nn.Conv2d(8, 16, 3, dtype=dtype).eval()
    dense.weight.requires_grad_(False)
    dense.bias.requires_grad_(False)
    sep = DepthwiseSeparableConv2d.from_conv(dense)
    assert all(p.dtype == dtype and p.device == dense.weight.device for p in sep.parameters())
    assert all(not p.requires_grad for p in sep.parameters())
    assert not sep.training and not sep.depthwise.training
    train = DepthwiseSeparableConv2d.from_conv(nn.Conv2d(8, 16, 3).train())
    assert train.training and all(p.requires_grad for p in train.parameters())


def test_random_init_differs_from_svd_but_keeps_bias():
    torch.manual_seed(0)
    dense = nn.Conv2d(8, 16, 3)
    svd = DepthwiseSeparableConv2d.from_conv(dense, depth_multiplier=9)
    rnd = DepthwiseSeparableConv2d.from_conv(dense, depth_multiplier=9, init="random")
    assert torch.equal(rnd.bias, dense.bias)
    x = torch.randn(1, 8, 10, 10)
    with torch.no_grad():
        assert rel_err(svd(x), dense(x)) < 1e-5
        assert rel_err(rnd(x), dense(x)) > 0.1


@pytest.mark.parametrize("order", ["dw_pw", "pw_dw"])
def test_block_trains_gradients_reach_both_stages(order):
    torch.manual_seed(0)
    blk = DepthwiseSeparableConv2d.from_conv(nn.Conv2d(4, 8, 3, padding=1), order=order)
    target = torch.randn(2, 8, 6, 6)
    x = torch.randn(2, 4, 6, 6)
    opt = torch.optim.SGD(blk.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((blk(x) - target) ** 2).mean()
        loss.backward()
        assert blk.depthwise.weight.grad.abs().sum() > 0
        assert blk.pointwise.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(order="dw_dw"), "order"), (dict(depth_multiplier=0), "depth_multiplier"),
    (dict(mid_norm="layernorm"), "mid_norm"), (dict(mid_act="swish2"), "mid_act"),
])
def test_constructor_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DepthwiseSeparableConv2d(8, 8, 3, **kwargs)
