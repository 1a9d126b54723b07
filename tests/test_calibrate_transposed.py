"""Calibration of transposed separable blocks: transposed-conv patches and the least-squares refit."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsrewrite.kinds.separable_nd import SeparableConvNd
from dsrewrite.refit.calibrate import calibrate
from dsrewrite.refit.patches_nd import sample_positions_nd
from dsrewrite.refit.patches_transposed import gather_transposed_patches

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@pytest.mark.parametrize("d,kernel,stride,padding,dilation,output_padding", [
    (1, (4,), 2, 1, 1, 0),
    (1, (3,), 3, 2, 2, 1),
    (2, (4, 4), 2, 1, 1, 0),  # pix2pix
    (2, (3, 2), (2, 3), (1, 0), (1, 2), (1, 2)),
    (3, (3, 3, 3), 2, 1, 1, 1),
    (3, (2, 3, 1), (1, 2, 2), (0, 1, 0), 1, (0, 1, 1)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transposed_patches_reproduce_conv_transpose(d, kernel, stride, padding, dilation, output_padding, dtype):
    g = torch.Generator().manual_seed(d)
    z = torch.randn(2, 3, *([5, 4, 3][:d]), generator=g, dtype=dtype)
    w = torch.randn(3, 4, *kernel, generator=g, dtype=dtype)  # (C_in, C_out, *k)
    y = _CONV_T[d](z, w, stride=stride, padding=padding, output_padding=output_padding, dilation=dilation)
    pos = sample_positions_nd((y.shape[0], *y.shape[2:]), 10**6)  # every output position
    p = gather_transposed_patches(z, pos, kernel, stride, padding, dilation)
    got = torch.einsum("pck,cok->po", p, w.reshape(3, 4, -1))
    want = y.movedim(1, -1)[tuple(pos.T)]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    err = float((got - want).abs().max())
    assert err <= tol * max(1.0, float(want.abs().max())), f"max |Δ| = {err:.3e}"


def test_transposed_patches_reject_bad_shapes():
    with pytest.raises(ValueError, match="positions"):
        gather_transposed_patches(torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, dtype=torch.long), (3, 3))


def correlated(d: int, channels: int, size: int, n: int, seed: int) -> list[torch.Tensor]:
    """Inputs near a 3-dim channel subspace, spatially smooth (what trained features look like)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, 3, generator=torch.Generator().manual_seed(99))
    out = []
    for _ in range(n):
        lat = _POOL[d](torch.randn(2, 3, *([size] * d), generator=g), 3, 1, 1)
        out.append(torch.einsum("cl,nl...->nc...", mix, lat) + 0.05 * torch.randn(2, channels, *([size] * d),
                                                                                   generator=g))
    return out


def output_error(original: nn.Module, model: nn.Module, batches) -> float:
    with torch.no_grad():
        err = sum(float(((model(b).double() - original(b).double()) ** 2).sum()) for b in batches)
        ref = sum(float((original(b).double() ** 2).sum()) for b in batches)
    return math.sqrt(err / ref)


CASES = {
    "pix2pix_2d": (2, lambda: nn.ConvTranspose2d(16, 8, 4, 2, 1), 8),
    "3d_output_padding": (3, lambda: nn.ConvTranspose3d(8, 8, 3, 2, 1, output_padding=1), 5),
    "1d": (1, lambda: nn.ConvTranspose1d(16, 8, 4, 2, 1), 16),
    "grouped_2d": (2, lambda: nn.ConvTranspose2d(16, 8, 4, 2, 1, groups=2, bias=False), 8),
}


def setup(case: str, order: str, m: int):
    d, make, size = CASES[case]
    torch.manual_seed(0)
    net = nn.Sequential(make()).eval()
    light = nn.Sequential(SeparableConvNd.from_conv(net[0], depth_multiplier=m, order=order)).eval()
    c = net[0].in_channels
    return net, light, correlated(d, c, size, 4, seed=1), correlated(d, c, size, 2, seed=2)


@pytest.mark.parametrize("alternate", [3, 0])
@pytest.mark.parametrize("order", ["dw_pw", "pw_dw"])
@pytest.mark.parametrize("case", list(CASES))
def test_calibration_lowers_held_out_error_of_transposed_blocks(case, order, alternate):
    """Last stage (alternate=0) and, for dense blocks, joint refits: held-out error below SVD's, never above."""
    net, light, calib, held_out = setup(case, order, 1)
    svd_err = output_error(net, light, held_out)
    res = calibrate(net, light, calib, alternate=alternate)
    cal_err = output_error(net, light, held_out)
    (l,) = res.layers
    grouped = case.startswith("grouped")
    # the guarantee on the calibration data (the layer's own sampled positions: all of them here)
    assert l.rel_error_after <= l.rel_error_before * (1 + 1e-9), l
    assert abs(output_error(net, light, calib) - l.rel_error_after) < 1e-4, l
    assert l.steps and l.steps[0] == "last", l
    assert l.method == ("alternating" if alternate and not grouped else "last_stage"), l
    assert cal_err < 0.95 * svd_err, f"{case} {order} alternate={alternate}: held-out rel error " \
                                     f"calibrated {cal_err:.4f} vs SVD {svd_err:.4f}"
    assert not res.notes, res.notes
    print(f"{case} {order} alternate={alternate}: held-out rel error SVD {svd_err:.4f} -> calibrated {cal_err:.4f}")


@pytest.mark.parametrize("order", ["dw_pw", "pw_dw"])
@pytest.mark.parametrize("case", list(CASES))
def test_full_rank_transposed_stays_exact(case, order):
    d, make, _ = CASES[case]
    k = math.prod(make().kernel_size)
    net, light, calib, held_out = setup(case, order, k)
    res = calibrate(net, light, calib)
    err = output_error(net, light, held_out)
    assert err < 1e-5, f"{case} {order}: full-rank held-out rel error after calibration {err:.3e}"
    # computed from the transposed patches' statistics: ~0 only when they match the block's forward
    assert res.layers[0].rel_error_before < 1e-5 and res.layers[0].rel_error_after < 1e-5, res.layers[0]


@pytest.mark.parametrize("order", ["dw_pw", "pw_dw"])
def test_fit_through_following_relu_and_nonlinear_blocks(order):
    """A transposed conv feeding a ReLU is fitted through it (its error never rises); a block with
    ``mid_act`` (not linear) gets a last-stage refit."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.ReLU()).eval()
    calib = correlated(2, 16, 8, 4, seed=1)
    light = copy.deepcopy(net)
    light[0] = SeparableConvNd.from_conv(net[0], depth_multiplier=1, order=order)
    (l,) = calibrate(net, light, calib, max_positions=10**6).layers
    assert l.activation and l.act_error_after <= l.act_error_before * (1 + 1e-9), l
    assert l.act_error_after < 0.95 * l.act_error_before, l
    light[0] = SeparableConvNd.from_conv(net[0], depth_multiplier=2, order=order, mid_act="relu")
    (l,) = calibrate(net, light, calib, activation="none").layers
    assert l.method == "last_stage" and l.rel_error_after < l.rel_error_before, l


def test_rejected_refit_keeps_transposed_weights():
    """A refit that cannot lower the error (here: already exact) leaves the block bit for bit."""
    net, light, calib, _ = setup("pix2pix_2d", "pw_dw", 16)
    before = copy.deepcopy(light.state_dict())
    res = calibrate(net, light, calib)
    assert res.layers[0].steps == () and "rejected" in res.layers[0].note, res.layers[0]
    assert all(torch.equal(before[k], v) for k, v in light.state_dict().items())


def test_names_accepts_transposed_blocks_and_checks_output_padding():
    from dsrewrite.refit.results import CalibrationUsageError

    net, light, calib, _ = setup("3d_output_padding", "dw_pw", 1)
    assert [l.name for l in calibrate(net, light, calib, names=["0"]).layers] == ["0"]
    other = nn.Sequential(nn.ConvTranspose3d(8, 8, 3, 2, 1, output_padding=0)).eval()
    with pytest.raises(CalibrationUsageError, match="output_padding"):
        calibrate(other, light, calib)
