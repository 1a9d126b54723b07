"""N-d, grouped and transposed separable blocks: exactness at full rank, Eckart–Young, formulas, gradients.

Every numerical check compares against the dense conv it replaces and prints the max error.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dsrewrite.errors import UnsupportedConvError
from dsrewrite.factorize import compose, kernel_slices, spectrum
from dsrewrite.kinds import get_kind, kind_of
from dsrewrite.kinds.separable import DepthwiseSeparableConv2d
from dsrewrite.kinds.separable_nd import SeparableConvNd, check_separable, dense_kernel, standard_kernel
from dsrewrite.planning.types import LayerConfig

DATA = Path(__file__).parent / "data"
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ORDERS = ("dw_pw", "pw_dw")
TOL = {torch.float32: 2e-4, torch.float64: 1e-10}  # relative to max |y|


def build(conv: nn.Module, order: str, m: int, **kw) -> nn.Module:
    return get_kind(order).build(conv, LayerConfig(order=order, depth_multiplier=m, **kw))


def assert_reproduces(conv: nn.Module, block: nn.Module, x: torch.Tensor, what: str) -> None:
    with torch.no_grad():
        y, yb = conv(x), block(x)
    assert y.shape == yb.shape, f"{what}: shape {tuple(yb.shape)} vs dense {tuple(y.shape)}"
    err = float((y - yb).abs().max())
    scale = max(1.0, float(y.abs().max()))
    assert err <= TOL[x.dtype] * scale, f"{what}: max error {err:.3e} (scale {scale:.3g}, dtype {x.dtype})"


def conv_from(draw, transposed: bool, dims: int):
    """A random torch conv with every hyperparameter drawn, and an input that fits it."""
    k = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    if math.prod(k) == 1:
        k = (2,) + k[1:]
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    groups = draw(st.sampled_from([1, 1, 2]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    if groups > 1 and cin == groups:  # depthwise: refused by design, make it grouped instead
        cin *= 2
    bias = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    size = tuple(draw(st.integers(3, 7)) for _ in range(dims))  # odd and even sizes
    if transposed:
        pad = tuple(draw(st.integers(0, (dil[i] * (k[i] - 1)) // 2)) for i in range(dims))
        outpad = tuple(draw(st.integers(0, max(0, min(stride[i], dil[i]) - 1))) for i in range(dims))
        conv = getattr(nn, f"ConvTranspose{dims}d")(cin, cout, k, stride, pad, outpad, groups, bias, dil, dtype=dtype)
    else:
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        if draw(st.booleans()) and all(s == 1 for s in stride):
            pad = draw(st.sampled_from(["same", "valid"]))
        else:
            pad = tuple(draw(st.integers(0, (k[i] - 1) // 2 * dil[i])) for i in range(dims))
        if mode == "reflect" or mode == "circular":  # torch needs the padding smaller than the input
            size = tuple(max(s, 2 * dil[i] * k[i] + 1) for i, s in enumerate(size))
        size = tuple(max(s, dil[i] * (k[i] - 1) + 1) for i, s in enumerate(size))
        conv = getattr(nn, f"Conv{dims}d")(cin, cout, k, stride, pad, dil, groups, bias, mode, dtype=dtype)
    x = torch.randn(draw(st.integers(1, 2)), cin, *size, dtype=dtype)
    return conv, x


@st.composite
def convs(draw, transposed: bool, dims: st.SearchStrategy = st.sampled_from([1, 2, 3])):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return conv_from(draw, transposed, draw(dims))


@SETTINGS
@given(case=convs(transposed=False, dims=st.sampled_from([1, 3])), order=st.sampled_from(ORDERS))
def test_conv1d_conv3d_exact_at_full_rank(case, order):
    conv, x = case
    block = build(conv, order, math.prod(conv.kernel_size))
    assert isinstance(block, SeparableConvNd) and kind_of(block).name == order
    assert_reproduces(conv, block, x, f"{order} {conv}")


@SETTINGS
@given(case=convs(transposed=True), order=st.sampled_from(ORDERS))
def test_transposed_exact_at_full_rank(case, order):
    conv, x = case
    block = build(conv, order, math.prod(conv.kernel_size))
    assert isinstance(block.depthwise, type(conv)) and block.output_padding == conv.output_padding
    assert_reproduces(conv, block, x, f"{order} {conv}")


@SETTINGS
@given(case=convs(transposed=False, dims=st.just(2)), order=st.sampled_from(ORDERS), groups=st.sampled_from([2, 4]))
def test_grouped_conv2d_exact_at_full_rank(case, order, groups):
    dense, x = case
    conv = nn.Conv2d(2 * groups, 3 * groups, dense.kernel_size, dense.stride, dense.padding, dense.dilation,
                     groups, dense.bias is not None, dense.padding_mode, dtype=x.dtype)
    x = torch.randn(x.shape[0], 2 * groups, *x.shape[2:], dtype=x.dtype)
    block = build(conv, order, math.prod(conv.kernel_size))
    assert block.pointwise.groups == groups and block.groups == groups
    assert_reproduces(conv, block, x, f"{order} {conv}")


def test_transposed_output_size_argument():
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1).double()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    for order in ORDERS:
        block = build(up, order, 9)
        with torch.no_grad():
            y, yb = up(x, output_size=[10, 10]), block(x, output_size=[10, 10])
        assert yb.shape == y.shape == (1, 6, 10, 10)
        assert float((y - yb).abs().max()) < 1e-10


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("conv", [
    nn.Conv3d(6, 8, 3, padding=1), nn.Conv1d(8, 6, 5), nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1),
    nn.Conv2d(8, 12, 3, groups=4), nn.ConvTranspose3d(4, 4, 3, groups=2),
], ids=lambda c: type(c).__name__ if isinstance(c, nn.Module) else c)
def test_eckart_young_tail_equality(conv, order):
    """Below full rank the block's kernel error is exactly the discarded singular values."""
    torch.manual_seed(1)
    conv = conv.double()
    w = standard_kernel(conv).detach()
    g = conv.groups
    s = spectrum(dense_kernel(conv).detach(), order)
    for m in (1, 2):
        block = build(conv, order, m)
        # the block's kernel in the regular layout, from its stages
        sp = block.depthwise.weight.detach().reshape(
            (conv.in_channels if order == "dw_pw" else conv.out_channels) * (m if order == "dw_pw" else 1),
            1 if order == "dw_pw" else m, *conv.kernel_size)
        composed = compose(sp, block.pointwise.weight.detach(), order, in_channels=conv.in_channels, groups=g)
        err2 = float(((composed - w) ** 2).sum())
        tail = float((s[:, m:] ** 2).sum())
        assert abs(err2 - tail) <= 1e-9 * max(1.0, float((w ** 2).sum())), f"m={m}: ‖W−Ŵ‖²={err2:.6e} vs tail {tail:.6e}"
        rel = get_kind(order).weight_error(dense_kernel(conv), m)
        assert abs(rel - math.sqrt(tail / float((w ** 2).sum()))) < 1e-9


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("conv,inp", [
    (nn.Conv3d(6, 8, 3, padding=1), (1, 6, 5, 5, 5)),
    (nn.Conv1d(8, 6, 5, bias=False), (2, 8, 20)),
    (nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1), (1, 6, 5, 5)),
    (nn.Conv2d(8, 12, 3, groups=4), (1, 8, 7, 7)),
    (nn.ConvTranspose3d(4, 6, 3, stride=2, groups=2, bias=False), (1, 4, 3, 3, 3)),
], ids=lambda c: type(c).__name__ if isinstance(c, nn.Module) else None)
def test_parameter_formulas_and_gradients(conv, inp, order):
    torch.manual_seed(2)
    g, cin, cout, k = conv.groups, conv.in_channels, conv.out_channels, math.prod(conv.kernel_size)
    for m in (1, 3):
        block = build(conv, order, m)
        n = sum(p.numel() for p in block.parameters())
        b = cout if conv.bias is not None else 0
        want = cin * m * k + m * cin * cout // g + b if order == "dw_pw" else m * cout * cin // g + k * m * cout + b
        assert n == want, f"{order} m={m}: {n} parameters, formula {want}"
        x = torch.randn(inp, requires_grad=True)
        block(x).square().sum().backward()
        for name, p in block.named_parameters():
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, f"no gradient reached {name}"
        assert x.grad is not None and float(x.grad.abs().sum()) > 0


@pytest.mark.parametrize("conv,match", [
    (nn.Conv3d(8, 8, 3, groups=8), "depthwise"),
    (nn.Conv1d(8, 16, 1), "already pointwise"),
    (nn.ConvTranspose3d(4, 4, 1), "already pointwise"),
    (nn.Linear(3, 3), "not a torch conv"),
    (nn.LazyConv3d(4, 3), "lazy"),
])
def test_refuses_what_cannot_be_represented(conv, match):
    with pytest.raises(UnsupportedConvError, match=match):
        check_separable(conv, name="decoder.x")
    for order in ORDERS:
        with pytest.raises(UnsupportedConvError, match=match):
            get_kind(order).check(conv, name="decoder.x")


def test_subclass_with_own_forward_refused():
    class Padded(nn.Conv3d):
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (1,) * 6))

    with pytest.raises(UnsupportedConvError, match="own forward"):
        check_separable(Padded(4, 4, 3))


def test_grouped_slices_are_the_group_blocks():
    w = torch.randn(8, 2, 3, 3, 3, dtype=torch.float64)  # groups=2: C_in = 4
    sl = kernel_slices(w, "dw_pw", groups=2)
    assert sl.shape == (4, 4, 27)
    assert torch.equal(sl[3], w[4:, 1].reshape(4, 27))  # input 3 = group 1, local channel 1


def test_dense_kernel_spectrum_matches_group_slices():
    conv = nn.Conv2d(8, 12, 3, groups=4).double()
    w = conv.weight.detach()
    per_group = torch.linalg.svdvals(kernel_slices(w, "dw_pw", groups=4))
    full = spectrum(dense_kernel(conv).detach(), "dw_pw")
    assert torch.allclose(full[:, :per_group.shape[1]], per_group)
    assert float(full[:, per_group.shape[1]:].abs().max()) < 1e-12  # the zero blocks add nothing


def test_conv2d_keeps_the_saved_class_and_old_files_reload():
    """A dense Conv2d still becomes a DepthwiseSeparableConv2d; a file saved by v0.1 still loads and runs."""
    block = build(nn.Conv2d(4, 6, 3), "dw_pw", 1)
    assert type(block) is DepthwiseSeparableConv2d
    saved = torch.load(DATA / "dsconv2d_v01.pt", weights_only=False)
    net, x, y = saved["model"], saved["x"], saved["y"]
    assert "groups" not in vars(net[0]) and "transposed" not in vars(net[0])  # really the old format
    assert torch.allclose(net(x), y, atol=1e-6)
    assert [kind_of(m).name for m in net] == ["dw_pw", "pw_dw"]
    assert get_kind("pw_dw").stages(net[1]).mid_norm == "mid_norm"
    assert net[0].groups == 1 and not net[0].transposed and net[0].spatial_dims == 2


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("conv,bn,shape", [
    (nn.Conv1d(6, 8, 3, padding=1), nn.BatchNorm1d(8), (2, 6, 16)),
    (nn.Conv3d(4, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8), (1, 4, 6, 6, 6)),
    (nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1), nn.BatchNorm2d(6), (1, 8, 5, 5)),
    (nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2), nn.BatchNorm3d(6), (1, 4, 3, 3, 3)),
    (nn.Conv2d(8, 12, 3, groups=4), nn.BatchNorm2d(12), (1, 8, 7, 7)),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None)
def test_batchnorm_folds_into_nd_blocks_and_plain_convs(conv, bn, shape, order):
    from dsrewrite.deploy.bn import fold_batchnorm

    torch.manual_seed(3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(shape)
    block = build(conv, order, 2, mid_norm="batchnorm")
    with torch.no_grad():
        block.mid_norm.running_mean.uniform_(-1, 1), block.mid_norm.running_var.uniform_(0.5, 2)
    for net in (nn.Sequential(conv, bn).eval(), nn.Sequential(block, copy.deepcopy(bn)).eval()):
        folded = fold_batchnorm(net)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules()), folded
        with torch.no_grad():
            err = float((folded(x) - net(x)).abs().max())
        assert err < 1e-4, f"{order} {net}: max error {err:.3e} after folding"
