"""Whole-model rewrites of 3-D, 1-D and transposed-conv models: what is selected, MACs, parity at full rank, save/reload.

MONAI's 3-D ``BasicUNet`` and ``UNet`` (random weights, 32³ inputs), a 1-D U-Net written here and a
pix2pix-style generator whose decoder upsamples with ``ConvTranspose2d(k=4, s=2)``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from dsrewrite.io.save import load_rewrite, save_rewrite
from dsrewrite.kinds import kind_of
from dsrewrite.kinds.separable_nd import SeparableConvNd
from dsrewrite.measure.macs import count_costs
from dsrewrite.planning.apply import apply_plan
from dsrewrite.planning.planner import plan
from dsrewrite.runtime.tolerance import parity_tolerance


def layer_macs(model: nn.Module, x: torch.Tensor, names: list[str]) -> int:
    costs = count_costs(model, x)
    return sum(c.macs for n, c in costs.modules.items() if any(n == k or n.startswith(k + ".") for k in names))


def check_parity(model: nn.Module, light: nn.Module, x: torch.Tensor, what: str) -> None:
    with torch.no_grad():
        y, yl = model(x), light(x)
    err = float((y - yl).abs().max())
    tol = parity_tolerance(y)
    assert err <= tol, f"{what}: max error {err:.3e} > tolerance {tol:.3e} ({y.dtype})"


def round_trip(light: nn.Module, p, fresh: nn.Module, x: torch.Tensor, tmp_path: Path) -> None:
    w, pj = save_rewrite(light, p, tmp_path / "light.pt")
    back = load_rewrite(fresh, pj, w)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), light.eval()(x)), "the reloaded rewrite computes something else"
    assert [n for n, m in back.named_modules() if kind_of(m)] == [n for n, m in light.named_modules() if kind_of(m)]


def run_case(model: nn.Module, make_fresh, x: torch.Tensor, recipe, expected: list[str], tmp_path: Path,
             min_drop: float = 10.0, full_rank: int = 27) -> None:
    model.eval()
    p = plan(model, recipe, x, depth_multiplier=1)
    names = [e.name for e in p.replaced]
    assert names == expected, f"replaced {names}"
    light = apply_plan(model, p)
    assert all(isinstance(light.get_submodule(n), SeparableConvNd) for n in names)
    dense, sep = layer_macs(model, x, names), layer_macs(light, x, names)
    assert dense / sep >= min_drop, f"MACs of the replaced layers: {dense:,} → {sep:,} ({dense / sep:.1f}×)"
    p_full = plan(model, recipe, x, depth_multiplier=full_rank)
    check_parity(model, apply_plan(model, p_full), x, f"m={full_rank}")
    round_trip(light, p, make_fresh(), x, tmp_path)


# --- MONAI 3-D U-Nets -------------------------------------------------------------------------
monai_nets = pytest.importorskip("monai.networks.nets", reason="monai is not installed")


def basic_unet() -> nn.Module:
    torch.manual_seed(0)
    return monai_nets.BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(16, 16, 32, 32, 64, 16))


def monai_unet() -> nn.Module:
    torch.manual_seed(0)
    return monai_nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128),
                           strides=(2, 2, 2), num_res_units=2)


def test_monai_basic_unet_decoder_only(tmp_path):
    x = torch.randn(1, 1, 32, 32, 32)
    expected = [f"upcat_{i}.convs.conv_{j}.conv" for i in (4, 3, 2, 1) for j in (0, 1)]
    run_case(basic_unet(), basic_unet, x, "decoder_only", expected, tmp_path)


def test_monai_unet_decoder_only(tmp_path):
    x = torch.randn(1, 1, 32, 32, 32)
    # the dense 3×3×3 convs after each upsampling ConvTranspose3d (the last one has 2 input channels: a head)
    expected = ["model.1.submodule.1.submodule.2.1.conv.unit0.conv", "model.1.submodule.2.1.conv.unit0.conv"]
    run_case(monai_unet(), monai_unet, x, "decoder_only", expected, tmp_path)


def test_all_3x3x3_takes_the_encoder_too():
    x = torch.randn(1, 1, 32, 32, 32)
    p = plan(basic_unet().eval(), "all_3x3x3", x)
    assert len(p.replaced) == 17 and all(e.fact["conv_type"] == "Conv3d" for e in p.replaced)


# --- a 1-D U-Net ------------------------------------------------------------------------------
def block1d(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, 3, padding=1), nn.BatchNorm1d(cout), nn.ReLU(),
                         nn.Conv1d(cout, cout, 3, padding=1, padding_mode="reflect"), nn.ReLU())


class UNet1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = block1d(2, 16)
        self.down = nn.Sequential(nn.MaxPool1d(2), block1d(16, 32))
        self.bottom = nn.Sequential(nn.MaxPool1d(2), block1d(32, 64))
        self.up2 = nn.Upsample(scale_factor=2)
        self.dec2 = block1d(64 + 32, 32)
        self.up1 = nn.Upsample(scale_factor=2)
        self.dec1 = block1d(32 + 16, 16)
        self.out = nn.Conv1d(16, 3, 1)  # not "head": that name is a decoder region

    def forward(self, x):
        s1 = self.stem(x)
        s2 = self.down(s1)
        b = self.bottom(s2)
        d2 = self.dec2(torch.cat([self.up2(b), s2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), s1], 1))
        return self.out(d1)


def unet1d() -> nn.Module:
    torch.manual_seed(0)
    return UNet1d()


def test_unet1d_decoder_only(tmp_path):
    x = torch.randn(2, 2, 256)
    expected = ["dec2.0", "dec2.3", "dec1.0", "dec1.3"]
    run_case(unet1d(), unet1d, x, "decoder_only", expected, tmp_path, min_drop=2.0, full_rank=3)


# --- a pix2pix-style generator: ConvTranspose2d(k=4, s=2) upsampling -------------------------
class Pix2PixLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(32, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.LeakyReLU(0.2),
            nn.Conv2d(64, 128, 4, 2, 1), nn.BatchNorm2d(128), nn.LeakyReLU(0.2),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.ConvTranspose2d(32, 3, 4, 2, 1), nn.Tanh(),
        )

    def forward(self, x):
        return self.decoder(self.encoder(x))


def pix2pix() -> nn.Module:
    torch.manual_seed(0)
    return Pix2PixLike()


UPSAMPLING = {"name": "upsampling", "select": {"kernel_size": ["4x4"], "transposed": True, "regions": ["decoder"],
                                               "in_channels": {"min": 16}, "out_channels": {"min": 16}},
              "replace": {"order": "auto"}}


def test_pix2pix_transposed_decoder(tmp_path):
    x = torch.randn(1, 3, 64, 64)
    model = pix2pix()
    run_case(model, pix2pix, x, UPSAMPLING, ["decoder.0", "decoder.3"], tmp_path, min_drop=10.0, full_rank=16)
    p = plan(model.eval(), UPSAMPLING, x)
    assert {e.config.order for e in p.replaced} == {"pw_dw"}, [e.config.note for e in p.replaced]


@pytest.mark.parametrize("order", ["dw_pw", "pw_dw"])
def test_pix2pix_calibration_refits_the_transposed_decoder(order):
    """Whole model (random weights, smooth images): calibrating the ConvTranspose2d(k=4, s=2) blocks lowers the
    held-out output error against the dense model and each layer's error never rises (full rank: the small
    transposed blocks of tests/test_calibrate_transposed.py; here m=16 takes minutes)."""
    import math

    import torch.nn.functional as F

    from dsrewrite.refit.calibrate import calibrate

    def images(n: int, seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [F.avg_pool2d(torch.randn(2, 3, 64, 64, generator=g), 5, 1, 2) * 3 for _ in range(n)]

    def error(light: nn.Module, xs: list[torch.Tensor]) -> float:
        with torch.no_grad():
            e = sum(float(((light(x).double() - model(x).double()) ** 2).sum()) for x in xs)
            return math.sqrt(e / sum(float((model(x).double() ** 2).sum()) for x in xs))

    model, calib, held_out = pix2pix().eval(), images(4, 1), images(2, 2)
    recipe = {**UPSAMPLING, "replace": {"order": order, "depth_multiplier": 1}}
    light = apply_plan(model, plan(model, recipe, calib[0])).eval()
    svd_err = error(light, held_out)
    res = calibrate(model, light, calib)
    cal_err = error(light, held_out)
    assert [l.name for l in res.layers] == ["decoder.0", "decoder.3"] and not res.notes, res
    for l in res.layers:  # fitted through the following BN + ReLU: that error never rises
        assert l.activation and l.act_error_after <= l.act_error_before * (1 + 1e-9), l
    print(f"pix2pix {order} m=1: held-out output rel error SVD {svd_err:.4f} -> calibrated {cal_err:.4f}")
    assert cal_err < 0.8 * svd_err, f"{order}: held-out calibrated {cal_err:.4f} vs SVD {svd_err:.4f}"


def test_transposed_not_selected_unless_asked():
    p = plan(pix2pix().eval(), "decoder_only", torch.randn(1, 3, 64, 64))
    assert not p.replaced or all("Transpose" not in e.fact["conv_type"] for e in p.replaced)
    reasons = {e.name: e.reason for e in p.entries}
    assert "transposed" in reasons["decoder.0"]


def test_caller_model_unchanged():
    model = basic_unet().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    apply_plan(model, plan(model, "decoder_only", x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, SeparableConvNd) for m in model.modules())


# --- deployment: BN folding, channels_last_3d, ONNX -----------------------------------------
def batchnorm_unet3d() -> nn.Module:
    torch.manual_seed(0)
    net = monai_nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64), strides=(2, 2),
                          num_res_units=1, norm="batch")
    with torch.no_grad():  # non-trivial statistics, so that folding has something to get wrong
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("make,shape,recipe", [
    (batchnorm_unet3d, (1, 1, 32, 32, 32), "decoder_only"),
    (pix2pix, (1, 3, 64, 64), UPSAMPLING),
    (unet1d, (2, 2, 256), "decoder_only"),
], ids=["unet3d", "pix2pix", "unet1d"])
def test_prepare_for_deployment_folds_bn_and_uses_channels_last(make, shape, recipe):
    from dsrewrite.deploy.prepare import prepare_for_deployment

    x = torch.randn(shape)
    model = make().eval()
    light = apply_plan(model, plan(model, recipe, x)).eval()
    dep = prepare_for_deployment(light, x)  # raises ParityError when the deployed form differs
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in dep.modules())
    if len(shape) == 5:
        w = next(m for m in dep.modules() if isinstance(m, nn.Conv3d)).weight
        assert w.is_contiguous(memory_format=torch.channels_last_3d)
    check_parity(light, dep, x, "deployment form")


@pytest.mark.parametrize("make,shape,recipe", [
    (basic_unet, (1, 1, 32, 32, 32), "decoder_only"),
    (pix2pix, (1, 3, 64, 64), UPSAMPLING),
], ids=["basic_unet3d", "pix2pix_transposed"])
def test_onnx_export_parity(make, shape, recipe, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from dsrewrite.deploy.onnx import export_onnx

    x = torch.randn(shape)
    model = make().eval()
    light = apply_plan(model, plan(model, recipe, x)).eval()
    res = export_onnx(light, x, tmp_path / "m.onnx")  # check=True: ONNX Runtime against eager, raises on mismatch
    assert (tmp_path / "m.onnx").is_file()
    assert res.checked and res.max_abs_diff is not None and res.max_abs_diff <= res.tolerance, res
    print(f"ONNX Runtime vs eager: max |Δ| = {res.max_abs_diff:.3e} (tolerance {res.tolerance:.3e}, {res.exporter})")


def test_calibration_refits_transposed_blocks_too():
    from dsrewrite.refit.calibrate import calibrate
    from dsrewrite.refit.results import CalibrationUsageError

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.ConvTranspose2d(16, 16, 4, 2, 1)).eval()
    recipe = {"name": "t", "select": {"transposed": "any", "in_channels": {"min": 16}}}
    x = torch.randn(2, 3, 12, 12)
    light = apply_plan(net, plan(net, recipe, x))
    up = copy.deepcopy(light[3].state_dict())
    res = calibrate(net, light, [x])
    assert [l.name for l in res.layers] == ["2", "3"]
    assert not any("initialisation" in n for n in res.notes), res.notes
    assert res.layers[1].rel_error_after < res.layers[1].rel_error_before, res.layers[1]
    assert not all(torch.equal(up[k], v) for k, v in light[3].state_dict().items())
    assert [l.name for l in calibrate(net, light, [x], names=["3"]).layers] == ["3"]
    with pytest.raises(CalibrationUsageError, match="not a replacement block"):
        calibrate(net, light, [x], names=["1"])


@pytest.mark.parametrize("order", ["dw_pw", "pw_dw"])
def test_calibration_refits_grouped_blocks(order):
    """ResNeXt-style grouped 3×3 convs: a last-stage refit per output lowers the output error."""
    from dsrewrite.refit.calibrate import calibrate

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=4),
                        nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=8, bias=False)).eval()
    recipe = {"name": "g", "select": {"groups": "any", "in_channels": {"min": 16}}, "replace": {"order": order}}
    x = [torch.randn(2, 3, 12, 12) for _ in range(2)]
    light = apply_plan(net, plan(net, recipe, x[0]))
    assert [light[i].groups for i in (2, 4)] == [4, 8]
    res = calibrate(net, light, x)
    assert [(l.name, l.method) for l in res.layers] == [("2", "last_stage"), ("4", "last_stage")]
    before, after = res.output_rel_error_before, res.output_rel_error_after
    assert after < 0.9 * before, f"output rel error {before:.4f} -> {after:.4f}"
    # at full rank the block is exact and calibration keeps it so
    full = apply_plan(net, plan(net, recipe, x[0], depth_multiplier=9))
    res_full = calibrate(net, full, x)
    assert res_full.output_rel_error_after < 1e-5, res_full.output_rel_error_after


def test_heal_matches_nd_blocks_layer_by_layer():
    from dsrewrite.refit.heal import heal

    torch.manual_seed(0)
    model = unet1d().eval()
    x = torch.randn(4, 2, 64)
    light = apply_plan(model, plan(model, "decoder_only", x))
    res = heal(light, model, [x], steps=3, lr=1e-3, progress=False)
    assert res.step == 3 and res.layer_losses[0] > 0, res  # the 1-d blocks are matched to the original convs
    assert res.losses[-1] < res.losses[0], res.losses


@pytest.mark.parametrize("order", ["dw_pw", "pw_dw"])
@pytest.mark.parametrize("dims", [1, 3])
def test_calibration_refits_1d_and_3d_blocks(dims, order):
    """A closed-form refit on data lowers the output error of the SVD initialisation (m=1), in 1-d and 3-d."""
    from dsrewrite.refit.calibrate import calibrate

    torch.manual_seed(0)
    conv, bn = getattr(nn, f"Conv{dims}d"), getattr(nn, f"BatchNorm{dims}d")
    net = nn.Sequential(conv(2, 16, 3, padding=1), bn(16), nn.ReLU(),
                        conv(16, 16, 3, padding=1, padding_mode="replicate"), nn.ReLU(),
                        conv(16, 16, 3, stride=2, dilation=1)).eval()
    size = (40,) if dims == 1 else (10, 10, 10)
    x = [torch.randn(2, 2, *size) for _ in range(3)]
    light = apply_plan(net, plan(net, {"name": "n", "select": {"in_channels": {"min": 16}},
                                      "replace": {"order": order}}, x[0]))
    assert [n for n, m in light.named_modules() if kind_of(m)] == ["3", "5"]
    res = calibrate(net, light, x)
    assert [l.name for l in res.layers] == ["3", "5"]
    before, after = res.output_rel_error_before, res.output_rel_error_after
    assert after < 0.9 * before, f"output rel error {before:.4f} -> {after:.4f}"
