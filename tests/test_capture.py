"""Tests of dsrewrite.capture: conv facts, graph predicates, fallbacks, and a model left untouched."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsrewrite.capture import capture
from dsrewrite.errors import InputShapeError
from dsrewrite.facts import PREDICATES

# ``dsrewrite.capture`` the attribute is the function (re-exported by the package); the module is here:
capmod = importlib.import_module("dsrewrite.planning.capture")

smp = pytest.importorskip("segmentation_models_pytorch")
timm = pytest.importorskip("timm")
tv_seg = pytest.importorskip("torchvision.models.segmentation")


def _x(size: int = 64) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


#: the graph predicates read off the captured graph (final_predictor comes from the eager run: tested apart)
GRAPH = ("after_concat", "after_upsample", "downstream_of_upsample")


def _preds(fact) -> tuple:
    return tuple(getattr(fact, p) for p in GRAPH)


def _fail(*_args, **_kwargs):
    raise RuntimeError("forced failure for the test")


# --------------------------------------------------------------------------- models


class PlainUNet(nn.Module):
    """A tiny U-Net with no telling names: a, b, c before the upsample; d, e after it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.d = nn.Conv2d(16 + 8, 8, 3, padding=1)
        self.e = nn.Conv2d(8, 2, 1)
        self.n = nn.BatchNorm2d(16)
        self.q = nn.Dropout2d(0.1)

    def forward(self, x):
        s = F.relu(self.a(x))
        y = F.relu(self.n(self.b(s)))
        y = F.relu(self.c(y))
        y = F.interpolate(y, scale_factor=2.0, mode="nearest")
        y = self.q(torch.cat([y, s], dim=1))
        y = F.relu(self.d(y))
        return self.e(y)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Conv2d(3, 4, 3, padding=1)
        self.r = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.r(F.relu(self.r(self.p(x))))


class FunctionalHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 4, 1, 1))

    def forward(self, x):
        return F.conv2d(x, self.w)


class WithFunctional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.head = FunctionalHead()
        self.unused = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.head(self.stem(x))


class Untraceable(nn.Module):
    """Branches on a tensor value: fx cannot trace it, export cannot guard on it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        if int(y.abs().sum()) > 0:
            y = F.interpolate(y, scale_factor=2.0)
        return self.b(y)


# --------------------------------------------------------------------------- smp Unet (fx)


@pytest.fixture(scope="module")
def unet_capture():
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=2)
    return model, capture(model, _x(64))


def test_unet_uses_fx_and_lists_every_conv_in_module_order(unet_capture):
    model, cap = unet_capture
    assert cap.method == "fx", cap.notes
    expected = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert [f.name for f in cap.facts] == expected
    assert cap.input_shape == (1, 3, 64, 64)
    assert cap.notes == ()
    assert cap.functional_convs == ()


def test_unet_decoder_predicates(unet_capture):
    _, cap = unet_capture
    dec = [f for f in cap.facts if f.region == "decoder" and f.kernel_size == (3, 3) and f.groups == 1
           and f.in_channels >= 16 and f.out_channels >= 16]
    assert len(dec) == 10, [f.name for f in dec]
    concat = {f.name for f in dec if f.after_concat}
    assert concat == {f"decoder.blocks.{i}.conv1.0" for i in range(4)}
    upsampled = {f.name for f in dec if f.after_upsample}
    assert upsampled == {f"decoder.blocks.{i}.conv1.0" for i in range(5)}
    assert all(f.downstream_of_upsample is True for f in cap.facts if f.region == "decoder")
    assert all(f.downstream_of_upsample is True for f in cap.facts if f.region == "segmentation_head")
    enc = [f for f in cap.facts if f.region == "encoder"]
    assert enc and all(_preds(f) == (False, False, False) for f in enc)


def test_unet_shapes_regions_and_hyperparameters(unet_capture):
    model, cap = unet_capture
    assert {f.region for f in cap.facts} == {"encoder", "decoder", "segmentation_head"}
    for f in cap.facts:
        mod = model.get_submodule(f.name)
        assert f.calls == 1 and not f.shared
        assert f.input_shape is not None and f.output_shape is not None
        assert f.input_shape[1] == f.in_channels and f.output_shape[1] == f.out_channels
        assert f.output_stride == 64 / f.output_shape[-2]
        assert (f.kernel_size, f.stride, f.padding, f.dilation, f.groups) == (
            mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.groups)
        assert f.bias == (mod.bias is not None) and f.plain and f.conv_type == "Conv2d"
        assert f.cls == "torch.nn.modules.conv.Conv2d" and f.dtype == "float32" and f.device == "cpu"
    by = cap.by_name()
    assert by["encoder.conv1"].output_stride == 2.0
    assert by["encoder.layer4.1.conv2"].output_stride == 32.0
    assert by["decoder.blocks.4.conv2.0"].output_stride == 1.0


def test_unet_export_agrees_with_fx(unet_capture, monkeypatch):
    """The two graph back-ends must give the same facts on the same model."""
    model, fx_cap = unet_capture
    monkeypatch.setattr(capmod, "_trace_fx", _fail)
    ex_cap = capture(model, _x(64))
    assert ex_cap.method == "export"
    assert any("torch.fx could not trace" in n and "forced failure" in n for n in ex_cap.notes), ex_cap.notes
    assert ex_cap.facts == fx_cap.facts


# --------------------------------------------------------------------------- export fallbacks


def test_unetplusplus_falls_back_to_export():
    torch.manual_seed(0)
    model = smp.UnetPlusPlus("resnet18", encoder_weights=None)
    cap = capture(model, _x(64))
    assert cap.method == "export"
    assert len(cap.notes) == 1 and "torch.fx could not trace" in cap.notes[0]
    assert all(f.input_shape is not None and f.calls == 1 for f in cap.facts)
    assert all(None not in _preds(f) for f in cap.facts)
    by = cap.by_name()
    assert by["decoder.blocks.x_0_0.conv1.0"].after_concat is True
    assert by["decoder.blocks.x_0_0.conv1.0"].after_upsample is True
    assert by["decoder.blocks.x_0_0.conv2.0"].after_upsample is False
    assert by["decoder.blocks.x_0_4.conv1.0"].after_concat is False  # last block: no skip
    assert by["decoder.blocks.x_0_4.conv1.0"].after_upsample is True
    assert all(f.downstream_of_upsample for f in cap.facts if f.region == "decoder")
    assert not any(f.downstream_of_upsample for f in cap.facts if f.region == "encoder")


def test_tf_efficientnet_conv2dsame_facts():
    """timm's Conv2dSame is an fx leaf (timm registers it), so fx traces tf_* models in timm 1.0.31."""
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_b0", pretrained=False)
    cap = capture(model, _x(64))
    assert cap.method == "fx", f"timm's leaves should make tf_* traceable by fx; notes: {cap.notes}"
    same = [f for f in cap.facts if f.cls.endswith("Conv2dSame")]
    assert same, "tf_efficientnet_b0 has Conv2dSame modules"
    assert all(not f.plain and f.conv_type == "Conv2d" for f in same)
    assert all(f.plain for f in cap.facts if f.cls == "torch.nn.modules.conv.Conv2d")
    stem = cap.by_name()["conv_stem"]
    assert stem.input_shape == (1, 3, 64, 64) and stem.output_shape == (1, 32, 32, 32)
    assert stem.output_stride == 2.0
    assert all(_preds(f) == (False, False, False) for f in cap.facts)  # a classifier: no upsample


def test_tf_efficientnet_export_path_maps_conv2dsame(monkeypatch):
    """Through export, Conv2dSame's pad + conv2d map back to the module, predicates known."""
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_b0", pretrained=False)
    fx_cap = capture(model, _x(64))
    monkeypatch.setattr(capmod, "_trace_fx", _fail)
    ex_cap = capture(model, _x(64))
    assert ex_cap.method == "export"
    assert ex_cap.facts == fx_cap.facts


@pytest.mark.parametrize("force_export", [False, True], ids=["fx", "export"])
def test_conv2dsame_after_upsample_and_cat(force_export, monkeypatch):
    """Export sees Conv2dSame as pad + conv2d: the site's input is the pad's input (the cat)."""
    from timm.layers import Conv2dSame

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.s = Conv2dSame(7, 4, 3, stride=2)

        def forward(self, x):
            return self.s(torch.cat([F.interpolate(self.a(x), scale_factor=2.0), x], 1))

    if force_export:
        monkeypatch.setattr(capmod, "_trace_fx", _fail)
    cap = capture(M(), _x(16))
    assert cap.method == ("export" if force_export else "fx")
    s = cap.by_name()["s"]
    assert not s.plain and s.conv_type == "Conv2d" and s.output_shape == (1, 4, 8, 8)
    assert _preds(s) == (True, True, True)
    assert _preds(cap.by_name()["a"]) == (False, False, False)


def test_timm_leaf_hiding_convs_falls_back_to_export():
    """mobilevit's MobileVitBlock is an opaque fx leaf holding convs: export must take over."""
    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", pretrained=False)
    cap = capture(model, _x(64))
    assert cap.method == "export"
    assert any("MobileVitBlock" in n for n in cap.notes), cap.notes
    reached = [f for f in cap.facts if f.calls > 0]
    assert reached and all(None not in _preds(f) for f in reached)


def test_fcn_resnet50_regions():
    torch.manual_seed(0)
    model = tv_seg.fcn_resnet50(weights=None, weights_backbone=None)
    cap = capture(model, _x(64))
    regions = {f.region for f in cap.facts}
    assert {"backbone", "classifier"} <= regions
    head = [f for f in cap.facts if f.region == "classifier"]
    assert [f.name for f in head] == ["classifier.0", "classifier.4"]
    assert head[0].kernel_size == (3, 3) and head[0].in_channels == 2048
    assert all(f.calls == 1 and f.output_stride == 8.0 for f in head)


# --------------------------------------------------------------------------- plain models


@pytest.mark.parametrize("force_export", [False, True], ids=["fx", "export"])
def test_plain_unet_predicates_without_telling_names(force_export, monkeypatch):
    torch.manual_seed(0)
    model = PlainUNet()
    if force_export:
        monkeypatch.setattr(capmod, "_trace_fx", _fail)
    cap = capture(model, _x(32))
    assert cap.method == ("export" if force_export else "fx")
    got = {f.name: _preds(f) for f in cap.facts}
    assert got == {
        "a": (False, False, False),
        "b": (False, False, False),
        "c": (False, False, False),
        "d": (True, True, True),   # through Dropout2d, after cat([upsampled, skip])
        "e": (False, False, True),  # after a ReLU: downstream only
    }
    assert cap.by_name()["b"].output_stride == 2.0 and cap.by_name()["e"].output_stride == 1.0
    assert {f.region for f in cap.facts} == {"a", "b", "c", "d", "e"}


@pytest.mark.parametrize("force_export", [False, True], ids=["fx", "export"])
def test_shared_conv_counts_calls(force_export, monkeypatch):
    if force_export:
        monkeypatch.setattr(capmod, "_trace_fx", _fail)
    cap = capture(Twice(), _x(16))
    r = cap.by_name()["r"]
    assert r.calls == 2 and r.shared
    assert r.input_shape == (1, 4, 16, 16)
    p = cap.by_name()["p"]
    assert p.calls == 1 and not p.shared


@pytest.mark.parametrize("force_export", [False, True], ids=["fx", "export"])
def test_transposed_conv_is_an_upsample_and_predicates_or_over_call_sites(force_export, monkeypatch):
    if force_export:
        monkeypatch.setattr(capmod, "_trace_fx", _fail)
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 4, 2, stride=2)
            self.k = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            first = self.k(F.avg_pool2d(torch.cat([x, x[:, :1]], 1)[:, :4], 1))  # cat -> slice: not pass-through
            second = self.k(self.up(x).clone().to(torch.float32))  # after the transposed conv
            return first.sum() + second.sum()

    cap = capture(M(), _x(8))
    assert cap.method == ("export" if force_export else "fx")
    up, k = cap.by_name()["up"], cap.by_name()["k"]
    assert up.conv_type == "ConvTranspose2d" and up.output_stride == 0.5
    assert _preds(up) == (False, False, False)
    assert k.calls == 2 and _preds(k) == (False, True, True)


def test_functional_conv_listed():
    cap = capture(WithFunctional(), _x(16))
    assert [f.name for f in cap.facts] == ["stem", "unused"]
    assert len(cap.functional_convs) == 1
    assert "head" in cap.functional_convs[0] and "conv2d" in cap.functional_convs[0]
    unused = cap.by_name()["unused"]
    assert unused.calls == 0 and unused.input_shape is None and unused.output_stride is None
    assert _preds(unused) == (None, None, None)


def test_conv_directly_on_the_root_and_default_input():
    cap = capture(nn.Conv2d(3, 6, 3, padding=1), input_shape=(1, 3, 20, 20))
    assert cap.method == "export" and [f.name for f in cap.facts] == [""]
    assert cap.facts[0].region == "(root)" and cap.facts[0].output_shape == (1, 6, 20, 20)


def test_names_fallback_when_both_captures_fail():
    cap = capture(Untraceable(), _x(8))
    assert cap.method == "names"
    assert all(_preds(f) == (None, None, None) for f in cap.facts)
    assert [f.calls for f in cap.facts] == [1, 1] and cap.by_name()["b"].input_shape == (1, 4, 16, 16)
    assert len(cap.notes) == 1
    note = cap.notes[0]
    for word in ("torch.fx", "torch.export", *(p for p in PREDICATES if p != "final_predictor")):
        assert word in note, note
    # final_predictor comes from the eager run, so it is known here and the note must not call it lost
    assert [f.final_predictor for f in cap.facts] == [False, True]
    assert "final_predictor" not in note, note


def test_names_fallback_monkeypatched(monkeypatch):
    monkeypatch.setattr(capmod, "_trace_fx", _fail)
    monkeypatch.setattr(capmod, "_trace_export", _fail)
    cap = capture(PlainUNet(), _x(16))
    assert cap.method == "names" and cap.notes
    assert all(f.after_concat is None and f.after_upsample is None and f.downstream_of_upsample is None
               for f in cap.facts)
    assert all(f.output_shape is not None for f in cap.facts)


def test_bad_example_input_raises_input_shape_error():
    with pytest.raises(InputShapeError, match="cannot run on the example input"):
        capture(PlainUNet(), torch.randn(1, 5, 16, 16))
    with pytest.raises(InputShapeError, match="input_shape"):
        capture(PlainUNet(), input_shape=(1, 3, -4, 4))


# --------------------------------------------------------------------------- the user's model untouched


def _hook_dicts(m: nn.Module) -> list:
    return [m._forward_hooks, m._forward_pre_hooks, m._forward_hooks_with_kwargs,
            m._forward_hooks_always_called, m._forward_pre_hooks_with_kwargs, m._backward_hooks]


def _snapshot(model: nn.Module):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = [(n, m.training) for n, m in model.named_modules()]
    attrs = {n: dict(vars(m)) for n, m in model.named_modules()}
    return state, flags, attrs


def _assert_untouched(model: nn.Module, before) -> None:
    state, flags, attrs = before
    after = model.state_dict()
    assert list(after) == list(state)
    for k, v in state.items():
        assert torch.equal(after[k], v), f"{k} changed (max abs diff {(after[k].float() - v.float()).abs().max()})"
    assert [(n, m.training) for n, m in model.named_modules()] == flags
    for n, m in model.named_modules():
        assert not any(_hook_dicts(m)), f"hooks left on {n or '(root)'}"
        current = vars(m)
        assert sorted(current) == sorted(attrs[n]), f"attributes of {n or '(root)'} added or removed"
        swapped = [k for k, v in attrs[n].items() if current[k] is not v]
        assert not swapped, f"attribute objects of {n or '(root)'} replaced: {swapped}"


@pytest.mark.parametrize("path", ["fx", "export", "names"])
def test_model_untouched_in_train_mode(path, monkeypatch):
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=2).train()
    model.encoder.layer1.eval()  # mixed flags must come back exactly
    with torch.no_grad():  # non-trivial BN statistics
        model(_x(64) * 3 + 1)
    if path != "fx":
        monkeypatch.setattr(capmod, "_trace_fx", _fail)
    if path == "names":
        monkeypatch.setattr(capmod, "_trace_export", _fail)
    before = _snapshot(model)
    cap = capture(model, _x(64))
    assert cap.method == path
    _assert_untouched(model, before)


def test_model_untouched_when_forward_fails():
    model = PlainUNet().train()
    before = _snapshot(model)
    with pytest.raises(InputShapeError):
        capture(model, torch.randn(1, 4, 16, 16))
    _assert_untouched(model, before)


@pytest.mark.parametrize("dims", [1, 3])
def test_output_stride_of_1d_and_3d_convs(dims):
    # the length of a 1-d signal, the height H of an (N, C, D, H, W) volume: select.output_stride works on them
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    torch.manual_seed(0)
    model = nn.Sequential(conv(2, 4, 3, padding=1), conv(4, 4, 3, stride=2, padding=1),
                          conv(4, 4, 3, stride=2, padding=1))
    x = torch.randn(1, 2, *([8] * dims))
    cap = capture(model, x)
    assert [f.output_stride for f in cap.facts] == [1.0, 2.0, 4.0]
    # a conv whose rank differs from the input's has no output stride
    flat = capture(nn.Sequential(nn.Flatten(2), nn.Conv1d(2, 4, 3, padding=1)), torch.randn(1, 2, 4, 4))
    assert flat.facts[0].output_stride is None
