"""Calibration and healing data as users have it: DataLoader batch forms, image folders, tensor files,
multi-input models from the CLI, and the errors for data that cannot be used (docs/data.md)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dsrewrite import calib_data
from dsrewrite.batches import BatchError, input_spec, model_inputs
from dsrewrite.calib_data import open_calibration
from dsrewrite.calibrate import calibrate
from dsrewrite.cli import main
from dsrewrite.errors import UsageError
from dsrewrite.heal import heal
from dsrewrite.layers import DepthwiseSeparableConv2d

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def make_pair(c_in: int = 3, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    light = copy.deepcopy(net)
    light[2] = DepthwiseSeparableConv2d.from_conv(net[2], depth_multiplier=1)
    return net, light


def images(n: int, c: int = 3, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def reference(net: nn.Module, light: nn.Module, x: torch.Tensor, batch_size: int) -> nn.Module:
    """``light`` calibrated on plain tensor batches of ``x``: what every batch form must reproduce."""
    ref = copy.deepcopy(light)
    calibrate(net, ref, list(x.split(batch_size)))
    return ref


class DictDataset(Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "mask": (self.x[i, 0] > 0).long(), "name": f"img{i}.png"}


def run(args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def save_pngs(d: Path, n: int, mode: str, size: int = 12, seed: int = 0, suffix: str = ".png") -> None:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, len(mode))
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(d / f"im{i:03d}{suffix}")


# ------------------------------------------------------------------------------------------
# the batch forms of the Python API
# ------------------------------------------------------------------------------------------
def test_calibrate_from_dataloader_of_image_mask_tuples():
    net, light = make_pair()
    x = images(10)
    masks = (x[:, 0] > 0).long()
    ref = reference(net, light, x, 4)
    got = copy.deepcopy(light)
    res = calibrate(net, got, DataLoader(TensorDataset(x, masks), batch_size=4))
    assert res.images == 10 and res.batches == 3
    assert max_diff(got, ref) == 0.0, f"max weight diff {max_diff(got, ref)}"
    assert max_diff(got, light) > 0  # it was refit


def test_calibrate_from_dict_batches_with_input_key():
    net, light = make_pair()
    x = images(10)
    ref = reference(net, light, x, 4)
    got = copy.deepcopy(light)
    res = calibrate(net, got, DataLoader(DictDataset(x), batch_size=4), input_key="image")
    assert res.images == 10
    assert max_diff(got, ref) == 0.0, f"max weight diff {max_diff(got, ref)}"


def test_calibrate_with_input_fn():
    net, light = make_pair()
    x = images(8)
    ref = reference(net, light, x, 4)
    got = copy.deepcopy(light)
    batches = [{"data": {"pixels": b}, "id": i} for i, b in enumerate(x.split(4))]
    res = calibrate(net, got, batches, input_fn=lambda b: b["data"]["pixels"])
    assert res.images == 8
    assert max_diff(got, ref) == 0.0, f"max weight diff {max_diff(got, ref)}"


def test_rewrite_with_a_dict_loader_reports_fidelity_on_the_calibration_inputs():
    import dsrewrite

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    x = images(6)
    res = dsrewrite.rewrite_and_report(net, "all_3x3", example_inputs=x[:1],
                                       calibration=DataLoader(DictDataset(x), batch_size=3),
                                       calibration_options={"input_key": "image"})
    assert res.calibration.images == 6
    assert "calibration" in res.report.fidelity
    assert res.calibration.output_rel_error_after < res.calibration.output_rel_error_before


def test_heal_consumes_dataloader_of_tuples_and_dicts():
    net, light = make_pair()
    x = images(12)
    a, b = copy.deepcopy(light), copy.deepcopy(light)
    ra = heal(a, net, DataLoader(TensorDataset(x, x[:, 0]), batch_size=4), steps=6, lr=1e-2, progress=False)
    rb = heal(b, net, DataLoader(DictDataset(x), batch_size=4), steps=6, lr=1e-2, progress=False,
              input_key="image")
    assert ra.images == rb.images == 24
    assert ra.losses == rb.losses, (ra.losses, rb.losses)
    assert ra.losses[-1] < ra.losses[0]


class TwoInput(nn.Module):
    """A diffusion-U-Net-like model: ``forward(sample, timestep)``."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(c, 16, 3, padding=1)
        self.emb = nn.Linear(1, 16)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.conv_out = nn.Conv2d(16, c, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv_in(sample))
        h = h + self.emb(timestep.float()[:, None])[:, :, None, None]
        return self.conv_out(F.relu(self.mid(h)))


def test_tuple_maps_to_positional_inputs_by_the_example_inputs():
    model = TwoInput()
    s, t = torch.zeros(2, 4, 8, 8), torch.ones(2)
    two = input_spec(model)  # forward has two parameters without default
    assert model_inputs((s, t, "target"), 0, two)[1] is t
    got = model_inputs(((s, t), "target"), 0, two)
    assert got[0] is s and got[1] is t
    one = input_spec(nn.Identity(), torch.zeros(1))
    assert model_inputs((s, t), 0, one) is s
    with pytest.raises(BatchError, match=r"calibration batch 5 is a tuple of 1: \(Tensor\(2, 4, 8, 8\)\); the model "
                                         r"takes 2 positional inputs"):
        model_inputs((s,), 5, two)


@pytest.mark.parametrize("batch, kw, fragment", [
    ({"image": torch.zeros(1, 3, 8, 8), "mask": torch.zeros(1)}, {},
     "batch 0 is a dict with keys ['image', 'mask'], which are not all parameters of the model's forward"),
    ({"image": torch.zeros(1, 3, 8, 8)}, {"input_key": "imag"}, "has no input_key 'imag' (did you mean 'image'?)"),
    (("a.png", torch.zeros(1, 3, 8, 8)), {}, "batch 0 is a tuple of 2: (str, Tensor(1, 3, 8, 8))"),
    ("not a batch", {}, "batch 0 is a str"),
    ({"img": torch.zeros(1, 3, 8, 8)}, {"input_fn": lambda b: b["image"]}, "input_fn raised KeyError: 'image'"),
    (torch.zeros(1, 3, 8, 8), {"input_fn": lambda b: "x"}, "input_fn returned str"),
])
def test_unmappable_batches_raise_a_usage_error_that_says_what_to_pass(batch, kw, fragment):
    net, light = make_pair()
    before = copy.deepcopy(light.state_dict())
    with pytest.raises(BatchError) as info:
        calibrate(net, light, [batch], **kw)
    msg = str(info.value)
    assert isinstance(info.value, UsageError) and "\n" not in msg
    assert fragment in msg, msg
    assert "input_key" in msg or "input_fn" in msg, msg
    assert all(torch.equal(v, light.state_dict()[k]) for k, v in before.items())  # output unchanged


def test_data_that_is_not_an_iterable_of_batches_is_refused():
    net, light = make_pair()
    with pytest.raises(BatchError, match=r"must be an iterable of batches .* got Tensor\(2, 3, 8, 8\)"):
        calibrate(net, light, torch.zeros(2, 3, 8, 8))
    with pytest.raises(BatchError, match="heal data must be an iterable"):
        heal(light, net, torch.zeros(2, 3, 8, 8), steps=1, progress=False)
    with pytest.raises(BatchError, match="input_key or input_fn, not both"):
        calibrate(net, light, [torch.zeros(1, 3, 8, 8)], input_key="x", input_fn=lambda b: b)


# ------------------------------------------------------------------------------------------
# files and folders
# ------------------------------------------------------------------------------------------
def test_nested_folders_tif_and_npy_are_read_with_the_right_values(tmp_path):
    d = tmp_path / "data"
    (d / "class_a" / "deeper").mkdir(parents=True)
    (d / "class_b").mkdir()
    Image.fromarray(np.full((4, 4), 51, np.uint8), mode="L").save(d / "class_a" / "a.png")
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(d / "class_a" / "deeper" / "b.tif")  # 16-bit
    Image.fromarray(np.full((4, 4), 102, np.uint8), mode="L").save(d / "class_b" / "c.TIFF")
    np.save(d / "class_b" / "d.npy", np.full((4, 4), 7.0, np.float32))
    (d / "class_b" / "notes.txt").write_text("not data")
    data = open_calibration(d, input_shape=(1, 1, 4, 4), batch_size=8)
    assert (data.count, data.total, data.kind) == (4, 4, "images")
    (batch,) = list(data.loader)
    assert batch.shape == (4, 1, 4, 4)
    want = torch.tensor([51 / 255, 32768 / 65535, 102 / 255, 7.0])  # sorted path order; arrays not scaled
    err = float((batch.mean(dim=(1, 2, 3)) - want).abs().max())
    assert err < 1e-6, f"max error {err}"


def test_images_are_converted_to_the_model_channel_count_and_size(tmp_path):
    save_pngs(tmp_path / "rgb", 2, "RGB", size=10)
    for c in (1, 3, 4):
        (batch,) = list(open_calibration(tmp_path / "rgb", input_shape=(1, c, 6, 5), preset="none").loader)
        assert batch.shape == (2, c, 6, 5), (c, batch.shape)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 255
    (tmp_path / "rgba").mkdir()
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba" / "a.png")
    (x,) = list(open_calibration(tmp_path / "rgba", input_shape=(1, 4, 4, 4), mean="0.5", std="0.5").loader)
    assert torch.equal(x[0, 3], torch.ones(4, 4)) and torch.equal(x[0, :3], -torch.ones(3, 4, 4))
    (one,) = list(open_calibration(tmp_path / "rgba" / "a.png", input_shape=(1, 4, 4, 4), mean="0.5",
                                   std="0.5").loader)  # a single image file
    assert torch.equal(one, x)


def test_folder_decodes_only_the_limit_and_lazily(tmp_path, monkeypatch):
    save_pngs(tmp_path / "imgs", 30, "RGB", size=8)
    data = open_calibration(tmp_path / "imgs", input_shape=(1, 3, 8, 8), limit=5, batch_size=2)
    ds = data.loader.dataset
    assert ds.decoded == 0  # opening decodes nothing
    assert [len(b) for b in data.loader] == [2, 2, 1]
    assert ds.decoded == 5 and (data.count, data.total) == (5, 30)


def test_tensor_files_pt_npy_npz_and_channel_check(tmp_path):
    x = images(7, c=1)
    torch.save(x, tmp_path / "x.pt")
    np.save(tmp_path / "x.npy", x.numpy())
    np.savez(tmp_path / "x.npz", a=x[:3].numpy(), b=x[3:].numpy())
    for name in ("x.pt", "x.npy", "x.npz"):
        data = open_calibration(tmp_path / name, input_shape=(1, 1, 8, 8), batch_size=3, limit=6)
        got = torch.cat(list(data.loader))
        assert got.shape == (6, 1, 8, 8) and torch.equal(got, x[:6]), name
    with pytest.raises(UsageError, match=r"shape \(7, 1, 8, 8\), but the model takes \(N, 3, H, W\)"):
        open_calibration(tmp_path / "x.npy", input_shape=(1, 3, 8, 8))


# ------------------------------------------------------------------------------------------
# the CLI
# ------------------------------------------------------------------------------------------
@pytest.fixture
def small_model(tmp_path):
    def make(c: int) -> Path:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(32, c, 3, padding=1))
        path = tmp_path / f"net{c}.pt"
        torch.save(net, path)
        return path
    return make


@pytest.mark.parametrize("channels, mode", [(1, "L"), (4, "RGBA")])
def test_cli_calibrates_from_a_png_folder_for_1_and_4_channel_models(tmp_path, small_model, channels, mode,
                                                                     monkeypatch):
    model = small_model(channels)
    save_pngs(tmp_path / "imgs" / "sub", 9, mode, size=20)
    seen = []
    orig = calib_data.ImageFolderDataset.__getitem__
    monkeypatch.setattr(calib_data.ImageFolderDataset, "__getitem__", lambda self, i: seen.append(i) or orig(self, i))
    r = run(["apply", model, "--recipe", "all_3x3", "--input-shape", f"1,{channels},16,16", "--calib",
             tmp_path / "imgs", "--calib-limit", "7", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["calibration"]["images"] == 7
    assert "calibration data: 7 of 9 samples" in r.stderr
    assert sorted(seen) == list(range(7))  # only the limit was decoded, each once
    assert rep["calibration"]["output_rel_error_after"] < rep["calibration"]["output_rel_error_before"]


def test_cli_calibration_memory_does_not_grow_with_the_folder(tmp_path, small_model, monkeypatch):
    """The same --calib-limit over folders of 8 and 40 images decodes 8 images both times."""
    model = small_model(3)
    counts = []
    orig = calib_data.ImageFolderDataset.__getitem__

    def counting(self, i):
        counts[-1] += 1
        return orig(self, i)

    monkeypatch.setattr(calib_data.ImageFolderDataset, "__getitem__", counting)
    for n in (8, 40):
        save_pngs(tmp_path / f"f{n}", n, "RGB", size=16)
        counts.append(0)
        r = run(["apply", model, "--recipe", "all_3x3", "--input-shape", "1,3,16,16", "--calib", tmp_path / f"f{n}",
                 "--calib-limit", "8", "--dry-run", "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["calibration"]["images"] == 8
    assert counts == [8, 8]


def test_cli_heal_uses_all_of_more_than_64_images(tmp_path, small_model, monkeypatch):
    model = small_model(3)
    save_pngs(tmp_path / "imgs", 80, "RGB", size=8)
    out = tmp_path / "r.pt"
    r = run(["apply", model, "--recipe", "all_3x3", "--input-shape", "1,3,8,8", "-o", out])
    assert r.exit_code == 0, r.output
    seen = []
    orig = calib_data.ImageFolderDataset.__getitem__
    monkeypatch.setattr(calib_data.ImageFolderDataset, "__getitem__", lambda self, i: seen.append(i) or orig(self, i))
    r = run(["heal", model, "--rewritten", out, "--data", tmp_path / "imgs", "--input-shape", "1,3,8,8",
             "--steps", "10", "--batch-size", "8", "--lr", "1e-3", "--fidelity-batches", "0", "-o", tmp_path / "h.pt"])
    assert r.exit_code == 0, r.output
    assert sorted(seen) == list(range(80)), f"decoded {len(set(seen))} distinct images"  # each once (shuffled)
    assert "80 samples drawn from the 80" in r.output


def test_cli_multi_input_model_with_example_inputs_and_calibration_pt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "unet2.pt"
    torch.save(TwoInput(), path)
    g = torch.Generator().manual_seed(3)
    torch.save((torch.randn(1, 4, 12, 12, generator=g), torch.tensor([10.0])), tmp_path / "inputs.pt")
    calib = [(torch.randn(2, 4, 12, 12, generator=g), torch.rand(2, generator=g) * 1000) for _ in range(3)]
    torch.save(calib, tmp_path / "calib.pt")
    common = [path, "--trust-pickle", "--example-inputs", tmp_path / "inputs.pt"]
    r = run(["inspect", *common])
    assert r.exit_code == 0 and "mid" in r.output, r.output
    r = run(["plan", *common, "--recipe", "all_3x3"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "unet2.ds.pt"
    r = run(["apply", *common, "--recipe", "all_3x3", "--calib", tmp_path / "calib.pt", "-o", out, "--json"])
    assert r.exit_code == 0, r.output
    cal = json.loads(r.stdout)["calibration"]
    assert cal["images"] == 6 and cal["batches"] == 3
    assert cal["output_rel_error_after"] < cal["output_rel_error_before"], cal
    r = run(["heal", *common, "--rewritten", out, "--data", tmp_path / "calib.pt", "--steps", "4",
             "-o", tmp_path / "h.pt"])
    assert r.exit_code == 0, r.output
    assert "8 samples drawn from the 6" in r.output
    r = run(["apply", *common, "--input-shape", "1,4,12,12", "--recipe", "all_3x3", "--dry-run"])
    assert r.exit_code == 2 and "not both" in r.output


@pytest.mark.parametrize("setup, extra, fragment", [
    ("bad_batches", [], "calibration batch 0 is a tuple of 2: (str, str)"),
    ("rgb_pt_for_gray", [], "but the model takes (N, 1, H, W)"),
    ("imagenet_for_gray", ["--calib-preset", "imagenet"], "--calib-preset imagenet normalises 3 channels but the model takes 1"),
    ("mean_length", ["--calib-mean", "0.5,0.5"], "--calib-mean has 2 values but the model takes 1 channel(s)"),
    ("empty", [], "holds no images or arrays (searched recursively"),
    ("two_channels", [], "1 (grayscale), 3 (RGB) or 4 (RGBA) input channels; --input-shape gives 2"),
])
def test_cli_bad_data_exits_2_with_one_line(tmp_path, small_model, setup, extra, fragment):
    channels = 2 if setup == "two_channels" else 1
    model = small_model(channels)
    data = tmp_path / "data"
    data.mkdir()
    if setup == "bad_batches":
        data = tmp_path / "calib.pt"
        torch.save([("a.png", "b.png")], data)
    elif setup == "rgb_pt_for_gray":
        data = tmp_path / "calib.pt"
        torch.save(images(2, c=3), data)
    elif setup in ("imagenet_for_gray", "mean_length", "two_channels"):
        save_pngs(data, 2, "L", size=8)
    before = {p.name for p in tmp_path.iterdir()}
    r = run(["apply", model, "--recipe", "all_3x3", "--input-shape", f"1,{channels},8,8", "--calib", data,
             "-o", tmp_path / "out.pt", *extra])
    assert r.exit_code == 2, r.output
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert fragment in lines[0], lines[0]
    assert {p.name for p in tmp_path.iterdir()} == before  # nothing written


def test_docs_data_commands_parse(tmp_path, monkeypatch):
    """Every `dsrewrite` command line of docs/data.md parses with the real options (files stubbed)."""
    import re
    import shlex

    import click

    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text(encoding="utf-8")
    lines = [l.split("  #")[0] for l in re.findall(r"^dsrewrite .*$", text, re.M)]
    assert len(lines) >= 8, lines
    monkeypatch.chdir(tmp_path)
    for line in lines:
        argv = shlex.split(line)[1:]
        for a in argv:  # the paths a command checks for existence
            if a.endswith("/"):
                Path(a).mkdir(exist_ok=True)
            elif a.endswith((".pt", ".npy")) and not a.startswith("healed"):
                Path(a).touch()
        cmd = main.commands[argv[0]]
        with click.Context(main) as parent:
            ctx = cmd.make_context(argv[0], argv[1:], parent=parent)
        assert ctx.params, line


def test_example_inputs_file_forms(tmp_path):
    from dsrewrite.calib_data import example_inputs_for

    model = TwoInput()
    s, t = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.tensor([3])
    torch.save({"timestep": t, "sample": s}, tmp_path / "d.pt")
    (xs, xt), shape = example_inputs_for(model, path=tmp_path / "d.pt")  # dict -> forward's order
    assert shape is None and xs.dtype == torch.float32 and xt.dtype == torch.int64
    assert torch.equal(xs, s.float()) and torch.equal(xt, t)
    torch.save({"sample": s, "timestamp": t}, tmp_path / "bad.pt")
    with pytest.raises(UsageError, match=r"did you mean 'timestep'"):
        example_inputs_for(model, path=tmp_path / "bad.pt")
    torch.save(["not", "tensors"], tmp_path / "str.pt")
    with pytest.raises(UsageError, match="must hold a tensor, a tuple/list"):
        example_inputs_for(model, path=tmp_path / "str.pt")
    save_pngs(tmp_path / "imgs", 1, "RGB")
    with pytest.raises(UsageError, match="images feed a model with one"):
        open_calibration(tmp_path / "imgs", input_shape=None)


def test_one_tensor_for_a_multi_input_model_is_a_batch_error() -> None:
    """Found in review: a single-tensor batch for a (sample, timestep) model failed inside forward (exit 1)."""
    from dsrewrite.refit.batches import BatchError, input_spec, model_inputs

    class Two(nn.Module):
        def forward(self, sample, timestep):
            return sample

    with pytest.raises(BatchError, match="is one tensor .* the model takes 2 positional inputs"):
        model_inputs(torch.zeros(2, 3, 8, 8), 0, input_spec(Two()))
