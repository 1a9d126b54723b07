"""Checkpoints as training tools write them load without --trust-pickle and reproduce the model.

timm train.py (with argparse.Namespace and an EMA copy), Lightning (``model.`` prefix,
hyper_parameters, optimizer state), torch.compile (``_orig_mod.``, also after ``module.``,
and the compiled object itself), safetensors in and out, whole pickles of a torchvision
detector and of a diffusers U-Net (FrozenDict). Each loads through the safe loader, equals
the original, and is reproduced by a full-rank rewrite (depth multiplier 9 for 3×3).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import dsrewrite
from dsrewrite.cli import main
from dsrewrite.errors import ModelLoadError
from dsrewrite.io import load_model, load_rewrite, plan_path_for

ARCH = "timm:resnet18"


def _x(shape: tuple[int, ...] = (1, 3, 32, 32), seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _timm_r18(seed: int = 0) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    return timm.create_model("resnet18").eval()


def _assert_equal_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k}: max abs diff {(sa[k] - sb[k]).abs().max().item():.3e}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _full_rank_reproduces(model: nn.Module, x: Any, *, tol: float = 1e-4) -> None:
    """all_3x3 at depth multiplier 9 (exact for 3×3) gives the model's own outputs."""
    model = model.eval()
    light = dsrewrite.rewrite(model, "all_3x3", example_inputs=x, depth_multiplier=9)
    with torch.no_grad():
        y, z = model(x), light(x)
    err = _rel(z, y)
    assert err < tol, f"full-rank rewrite moved the outputs: rel L2 {err:.3e}"
    assert any(type(m).__name__ == "DepthwiseSeparableConv2d" for m in light.modules()), "nothing was replaced"


# ----------------------------------------------------------------------------- training-tool checkpoints


def test_timm_train_checkpoint_with_namespace_and_ema(tmp_path: Path) -> None:
    model, ema = _timm_r18(0), _timm_r18(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(_x()).sum().backward()
    opt.step()
    path = tmp_path / "checkpoint-3.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                "version": 2, "args": argparse.Namespace(model="resnet18", lr=0.1, epochs=100, amp=True),
                "state_dict_ema": ema.state_dict(), "metric": 71.3}, path)
    loaded = load_model(path, arch=ARCH)
    assert "key 'state_dict'" in loaded.source and "state_dict_ema" in loaded.source, loaded.source
    _assert_equal_weights(loaded.model, model)
    picked = load_model(path, arch=ARCH, state_dict_key="state_dict_ema")
    _assert_equal_weights(picked.model, ema)
    with pytest.raises(ModelLoadError, match="did you mean 'state_dict_ema'"):
        load_model(path, arch=ARCH, state_dict_key="state_dict_emma")
    _full_rank_reproduces(loaded.model, _x())


@pytest.mark.parametrize("extra_keys", [False, True], ids=["uniform", "with_loss_buffer"])
def test_lightning_checkpoint(tmp_path: Path, extra_keys: bool) -> None:
    model = _timm_r18(0)
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    if extra_keys:
        sd["loss_fn.pos_weight"] = torch.ones(3)  # a LightningModule holds more than the network
    opt = torch.optim.Adam(model.parameters())
    path = tmp_path / "epoch=3-step=100.ckpt"
    torch.save({"epoch": 3, "global_step": 100, "pytorch-lightning_version": "2.4.0", "state_dict": sd,
                "loops": {}, "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5)}},
                "optimizer_states": [opt.state_dict()], "lr_schedulers": [],
                "hyper_parameters": {"lr": 1e-3, "args": argparse.Namespace(backbone="resnet18")}}, path)
    loaded = load_model(path, arch=ARCH)
    assert "stripped 'model.' prefix" in loaded.source, loaded.source
    assert ("dropped 1 keys" in loaded.source) == extra_keys, loaded.source
    _assert_equal_weights(loaded.model, model)
    _full_rank_reproduces(loaded.model, _x())


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "model._orig_mod.", "net."])
def test_wrapper_prefixes_stripped_when_they_fit(tmp_path: Path, prefix: str) -> None:
    model = _timm_r18(0)
    path = tmp_path / "sd.pt"
    torch.save({f"{prefix}{k}": v for k, v in model.state_dict().items()}, path)
    loaded = load_model(path, arch=ARCH)
    assert f"stripped {prefix!r} prefix" in loaded.source, loaded.source
    _assert_equal_weights(loaded.model, model)


def test_prefix_that_does_not_fit_is_named(tmp_path: Path) -> None:
    model = _timm_r18(0)
    path = tmp_path / "sd.pt"
    torch.save({f"model.{k}": v for k, v in model.state_dict().items()}, path)
    with pytest.raises(ModelLoadError, match="the keys carry prefix 'model.'") as info:
        load_model(path, arch="torchvision:resnet34")
    assert "missing" in str(info.value)
    other = tmp_path / "other.pt"
    torch.save({f"backbone.{k}": v for k, v in model.state_dict().items()}, other)
    with pytest.raises(ModelLoadError, match="Every key starts with 'backbone.', which is neither"):
        load_model(other, arch=ARCH)
    lightning = tmp_path / "lightning.pt"  # found in review: a Lightning module holding `self.backbone`
    torch.save({f"model.backbone.{k}": v for k, v in model.state_dict().items()}, lightning)
    with pytest.raises(ModelLoadError, match="Every key starts with 'model.backbone.': 'model.' is a wrapper prefix "
                                             "dsrewrite strips, but 'backbone.' is not a part of arch"):
        load_model(lightning, arch=ARCH)


def test_cli_reads_a_lightning_checkpoint(tmp_path: Path) -> None:
    model = _timm_r18(0)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"args": argparse.Namespace(lr=0.1)}}, path)
    r = CliRunner().invoke(main, ["inspect", str(path), "--arch", ARCH, "--input-shape", "1,3,32,32"])
    assert r.exit_code == 0, r.output
    assert "layer1.0.conv1" in r.output


# ----------------------------------------------------------------------------- safetensors


def test_safetensors_in(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    model = _timm_r18(0)
    path = tmp_path / "model.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_model(path, arch=ARCH)
    _assert_equal_weights(loaded.model, model)
    _full_rank_reproduces(loaded.model, _x())


def test_safetensors_out_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("safetensors.torch")
    model = _timm_r18(0)
    src = tmp_path / "r18.pt"
    torch.save(model.state_dict(), src)
    out = tmp_path / "r18.ds.safetensors"
    r = CliRunner().invoke(main, ["apply", str(src), "--arch", ARCH, "--recipe", "all_3x3", "--input-shape",
                                  "1,3,32,32", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[8:9] == b"{", "not a safetensors file"
    assert plan_path_for(out).is_file()
    expected = dsrewrite.rewrite(model, "all_3x3", example_inputs=_x())
    # back through the plan sidecar: load_model(arch=...) and load_rewrite
    again = load_model(out, arch=ARCH)
    assert "rewritten per r18.ds.plan.json" in again.source, again.source
    rebuilt = load_rewrite(_timm_r18(5), plan_path_for(out), out)
    x = _x()
    with torch.no_grad():
        y = expected.eval()(x)
        for m in (again.model.eval(), rebuilt.eval()):
            err = (m(x) - y).abs().max().item()
            assert err < 1e-5, f"safetensors round trip moved the outputs by {err:.3e}"


def test_safetensors_needs_its_suffix(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["apply", "timm:resnet18", "--recipe", "all_3x3", "--input-shape", "1,3,32,32",
                                  "--save-format", "safetensors", "-o", str(tmp_path / "x.pt")])
    assert r.exit_code == 2 and ".safetensors" in r.stderr, r.output
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- whole pickles


def test_torch_compiled_model_object(tmp_path: Path) -> None:
    model = _timm_r18(0)
    compiled = torch.compile(model)
    path = tmp_path / "compiled.pt"
    torch.save(compiled, path)
    loaded = load_model(path)
    assert type(loaded.model) is type(model), type(loaded.model)
    _assert_equal_weights(loaded.model, model)
    _full_rank_reproduces(loaded.model, _x())
    # in memory too: rewrite() unwraps it like DataParallel
    light = dsrewrite.rewrite(compiled, "all_3x3", example_inputs=_x(), depth_multiplier=9)
    assert type(light) is type(model)


def test_torchvision_detector_whole_pickle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None).eval()
    path = tmp_path / "frcnn.pt"
    torch.save(det, path)
    loaded = load_model(path).model
    _assert_equal_weights(loaded, det)
    assert type(loaded.rpn.box_coder).__name__ == "BoxCoder"
    x = _x((1, 3, 96, 96))
    with torch.no_grad():
        a, b = det([x[0]]), loaded([x[0]])
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0]), "the reloaded detector answers differently"
    # full rank on the feature pyramid (detections are variable-length): every output level reproduced
    fpn = loaded.backbone.eval()
    light = dsrewrite.rewrite(fpn, "all_3x3", example_inputs=x, depth_multiplier=9)
    with torch.no_grad():
        fa, fb = fpn(x), light(x)
    for k in fa:
        assert _rel(fb[k], fa[k]) < 1e-4, f"level {k}: rel L2 {_rel(fb[k], fa[k]):.3e}"


def test_diffusers_unet_whole_pickle_with_frozendict(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers", reason="diffusers is in the dev extra")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = diffusers.UNet2DModel(
            sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=8).eval()
    path = tmp_path / "unet.pt"
    torch.save(unet, path)
    loaded = load_model(path).model
    assert type(loaded._internal_dict).__name__ == "FrozenDict" and loaded.config.in_channels == 3
    _assert_equal_weights(loaded, unet)
    x, t = _x((1, 3, 16, 16)), torch.tensor([10])
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, loaded(x, t).sample)
    # full rank on the multi-input (sample, timestep) model
    light = dsrewrite.rewrite(loaded, "all_3x3", example_inputs=(x, t), depth_multiplier=9)
    assert sum(type(m).__name__ == "DepthwiseSeparableConv2d" for m in light.modules()) > 0
    with torch.no_grad():
        err = _rel(light(x, t).sample, unet(x, t).sample)
    assert err < 1e-4, f"full-rank rewrite of the diffusers U-Net moved the outputs: rel L2 {err:.3e}"


def test_unpicklable_model_names_the_real_cause(tmp_path: Path) -> None:
    """A save that fails on pickling says so (not "free space"), offers safetensors, leaves nothing."""
    from dsrewrite.errors import OutputError
    from dsrewrite.io import save_rewrite
    from dsrewrite.plan_types import Plan

    model = nn.Linear(2, 2)
    model.fn = lambda x: x  # type: ignore[attr-defined]
    with pytest.raises(OutputError) as info:
        save_rewrite(model, Plan((), "all_3x3", "fx"), tmp_path / "o.pt")
    msg = str(info.value)
    assert "pickle cannot save" in msg and "safetensors" in msg and "free space" not in msg, msg
    assert list(tmp_path.iterdir()) == []
    w, _p = save_rewrite(model, Plan((), "all_3x3", "fx"), tmp_path / "o.safetensors", save_format="safetensors")
    assert w.is_file()


def test_empty_calibration_is_refused_not_ignored() -> None:
    """Found in review: rewrite(..., calibration=[]) refit nothing and said nothing."""
    from dsrewrite.errors import UsageError

    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    with pytest.raises(UsageError, match="gave no batch"):
        dsrewrite.rewrite(net, "all_3x3", example_inputs=_x((1, 3, 8, 8)), calibration=[])
