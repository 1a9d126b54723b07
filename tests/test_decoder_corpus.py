"""The "real decoder" corpus (tests/decoder_corpus.py): exact selections, verified capture, exact rewrite, ReLU fits.

Plus the library models the corpus stands for, when installed: MONAI's 2-D BasicUNet and
UNet, torchvision's Faster R-CNN (MobileNetV3 FPN) and RetinaNet (weights=None).
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import Tensor

from dsrewrite import rewrite
from dsrewrite.capture import capture
from dsrewrite.planner import plan
from dsrewrite.planning.verify import flatten_outputs
from dsrewrite.refit.activation import following_relus
from dsrewrite.refit.calibrate import calibrate

from decoder_corpus import CASES, Case

capmod = importlib.import_module("dsrewrite.planning.capture")
RECIPES = ("decoder_only", "post_concat", "post_upsample")


def _plan_selected(model, recipe: str, inputs) -> tuple[set[str], str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty selection warns; the set comparison says more
        p = plan(model, recipe, inputs)
    return {e.name for e in p.replaced}, p.table()


def _max_rel_error(ref, got) -> float:
    a, b = list(flatten_outputs(ref)), list(flatten_outputs(got))
    assert [p for p, _ in a] == [p for p, _ in b]
    worst = 0.0
    for (_, x), (_, y) in zip(a, b):
        if isinstance(x, Tensor) and x.is_floating_point() and x.numel():
            assert x.shape == y.shape
            worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-30)))
    return worst


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request) -> Case:
    return request.param


def test_selections_are_exact(case: Case) -> None:
    torch.manual_seed(0)
    model, x = case.build().eval(), case.inputs()
    for recipe in RECIPES:
        got, table = _plan_selected(model, recipe, x)
        want = set(getattr(case, recipe))
        assert got == want, f"{case.name} / {recipe}: extra {sorted(got - want)}, missing {sorted(want - got)}\n{table}"


def test_capture_is_verified_and_marks_final_predictors(case: Case) -> None:
    torch.manual_seed(0)
    model, x = case.build().eval(), case.inputs()
    cap = capture(model, x)
    assert cap.method == case.capture, (cap.verification, cap.notes)
    assert cap.verification.startswith(f"{case.capture}: "), cap.verification
    assert {f.name for f in cap.facts if f.final_predictor} == set(case.final_predictors)
    if case.final_predictors & {f.name for f in cap.facts if f.kernel_size == (3, 3) and f.out_channels >= 16}:
        p = plan(model, "decoder_only", x)  # big final predictors: kept dense, and the plan says why
        for name in case.final_predictors:
            entry = next(e for e in p.entries if e.name == name)
            assert not entry.replaced and "final predictor" in entry.reason, entry


def test_exact_at_full_rank(case: Case) -> None:
    """decoder_only at depth_multiplier = k·k represents every replaced 3×3 conv exactly (float64)."""
    torch.manual_seed(0)
    model = case.build().eval().double()
    x = tuple(t.double() if t.is_floating_point() else t for t in case.inputs())
    with torch.no_grad():
        ref = model(*x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = rewrite(model, "decoder_only", example_inputs=x, depth_multiplier=9)
    swapped = {n for n, m in new.named_modules() if type(m).__name__ == "DepthwiseSeparableConv2d"}
    assert swapped == set(case.decoder_only)
    with torch.no_grad():
        err = _max_rel_error(ref, new(*x))
    print(f"{case.name}: max relative error at m=9 (float64): {err:.2e}")
    assert err < 1e-10, f"{case.name}: max relative error {err:.3e} at full rank"


def test_calibration_fits_through_the_activation_the_graph_shows(case: Case) -> None:
    torch.manual_seed(0)
    model, x = case.build().eval(), case.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = rewrite(model, "decoder_only", example_inputs=x)
    batches = [tuple(t + 0.1 * i if t.is_floating_point() else t for t in x) for i in range(2)]
    found, note = following_relus(model, sorted(case.decoder_only), x)
    assert set(found) == set(case.relu_fits) and note == "", (sorted(found), note)
    res = calibrate(model, new, batches, example_inputs=x, alternate=0)
    shared = {layer.name for layer in res.layers if "shared" in layer.note}  # calibration skips shared convs
    assert shared == ({"head.classification_head.conv.0", "head.classification_head.conv.2",
                       "head.regression_head.conv.0", "head.regression_head.conv.2"}
                      if case.name == "fpn_detector" else set())  # RetinaNet-style heads run once per level
    fitted = {layer.name for layer in res.layers if layer.activation}
    assert fitted == set(case.relu_fits) - shared, (fitted, res.notes)
    assert not any("activation-aware refit off" in n for n in res.notes), res.notes


def test_diverging_trace_is_rejected_with_the_reason(monkeypatch) -> None:
    case = next(c for c in CASES if c.name == "diverging_trace")
    model, x = case.build().eval(), case.inputs()
    cap = capture(model, x)
    assert cap.method == "export"
    assert "fx rejected: torch.fx traced a graph that is not the model" in cap.verification
    assert "convolution" in cap.verification.lower() or "channels" in cap.verification, cap.verification
    p = plan(model, "post_concat", x)
    assert any(n.startswith("capture export: ") for n in p.notes), p.notes
    # both graphs wrong: names only, predicates unknown, and the plan says why
    monkeypatch.setattr(capmod, "_trace_export", lambda *a, **k: torch.export.export(
        torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1)), (x[0],), strict=False))
    cap = capture(model, x)
    assert cap.method == "names" and "export rejected: torch.export's graph is not the model" in cap.verification
    assert all(f.after_concat is None for f in cap.facts)
    assert cap.by_name()["final"].final_predictor is True  # from the eager run: known without a graph


def test_verification_runs_in_eval_with_the_models_randomness_seeded() -> None:
    """A model that draws noise in forward (dropout in train mode, torch.randn) verifies; its mode is kept."""

    class Noisy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.drop = torch.nn.Dropout(0.5)
            self.b = torch.nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            y = self.drop(self.a(x)) + 0.1 * torch.randn_like(x[:, :1])
            return self.b(torch.cat([torch.nn.functional.interpolate(y, scale_factor=2.0)], dim=1))

    model, x = Noisy().train(), torch.randn(1, 3, 8, 8)
    state = torch.random.get_rng_state()
    cap = capture(model, x)
    assert cap.method == "fx", cap.verification
    assert model.training and model.drop.training
    assert torch.equal(torch.random.get_rng_state(), state), "the caller's random stream moved"


# --------------------------------------------------------------------------- the libraries the corpus stands for


def _monai_cases():
    nets = pytest.importorskip("monai.networks.nets", reason="monai is not installed")
    basic = {f"upcat_{i}.convs.conv_{j}.conv" for i in range(1, 5) for j in (0, 1)}
    basic_first = {f"upcat_{i}.convs.conv_0.conv" for i in range(1, 5)}
    unit = {"model.1.submodule.1.submodule.2.1.conv.unit0.conv", "model.1.submodule.2.1.conv.unit0.conv"}
    return [
        # BasicUNet's UpCat concatenates only under torch.jit.isinstance(x_e, Tensor): fx drops the skips
        ("BasicUNet", lambda: nets.BasicUNet(spatial_dims=2, in_channels=3, out_channels=2,
                                            features=(16, 16, 32, 64, 128, 16)), "export",
         {"decoder_only": basic, "post_concat": basic_first, "post_upsample": basic_first}, {"final_conv"}),
        # UNet's concats feed transposed convs (never separated); the residual units read the upsample through ADN
        ("UNet", lambda: nets.UNet(spatial_dims=2, in_channels=3, out_channels=2, channels=(16, 32, 64, 128),
                                   strides=(2, 2, 2), num_res_units=1), "fx",
         {"decoder_only": unit, "post_concat": set(), "post_upsample": unit},
         {"model.2.0.conv", "model.2.1.conv.unit0.conv"}),
    ]


@pytest.mark.parametrize("which", ["BasicUNet", "UNet"])
def test_monai_2d_unets(which: str) -> None:
    name, build, method, want, finals = next(c for c in _monai_cases() if c[0] == which)
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cap = capture(model, x)
    assert cap.method == method, cap.verification
    assert {f.name for f in cap.facts if f.final_predictor} == finals
    for recipe, names in want.items():
        got, table = _plan_selected(model, recipe, x)
        assert got == names, f"{name} / {recipe}: extra {sorted(got - names)}, missing {sorted(names - got)}\n{table}"
    model64, x64 = model.double(), x.double()
    with torch.no_grad():
        ref = model64(x64)
    new = rewrite(model64, "decoder_only", example_inputs=x64, depth_multiplier=9)
    with torch.no_grad():
        err = _max_rel_error(ref, new(x64))
    print(f"monai {name}: max relative error at m=9 (float64): {err:.2e}")
    assert err < 1e-10
    found, note = following_relus(model64, sorted(want["decoder_only"]), x64)
    assert found == {} and note == ""  # LeakyReLU/PReLU after instance norm: no ReLU to fit through


def _detector(which: str):
    det = pytest.importorskip("torchvision.models.detection", reason="torchvision is not installed")
    kw = dict(weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128)
    if which == "fasterrcnn":
        return det.fasterrcnn_mobilenet_v3_large_320_fpn(**kw)
    return det.retinanet_resnet50_fpn(**kw)  # torchvision has no mobile RetinaNet


@pytest.mark.parametrize("which", ["fasterrcnn", "retinanet"])
def test_torchvision_detectors_decoder_only(which: str) -> None:
    """FPN, RPN and head convs are selected by their enclosing modules; the final predictors stay dense."""
    from dsrewrite.planning.planner import plan_from_capture
    from dsrewrite.recipe import load_recipe

    torch.manual_seed(0)
    model, x = _detector(which).eval(), torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    cap = capture(model, x)
    assert cap.method == "names", cap.verification  # data-dependent post-processing: neither graph captures it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = plan_from_capture(model, load_recipe("decoder_only"), cap)
    got = {e.name for e in p.replaced}
    finals = {f.name for f in cap.facts if f.final_predictor}
    if which == "fasterrcnn":
        # the box predictor is a Linear layer and the RPN's proposals are detached: no conv is a final predictor
        assert finals == set()
        assert got == {"backbone.fpn.layer_blocks.0.0", "backbone.fpn.layer_blocks.1.0", "rpn.head.conv.0.0"}, p.table()
        assert next(e for e in p.replaced if e.name == "rpn.head.conv.0.0").reason == "3×3, region 'rpn'"
        assert next(e for e in p.replaced if e.name.startswith("backbone.fpn")).reason.startswith(
            "3×3, region 'backbone.fpn'")
    else:
        assert finals == {"head.classification_head.cls_logits", "head.regression_head.bbox_reg"}
        towers = {f"head.{h}.conv.{i}.0" for h in ("classification_head", "regression_head") for i in range(4)}
        fpn = {f"backbone.fpn.layer_blocks.{i}.0" for i in range(3)} | {"backbone.fpn.extra_blocks.p6",
                                                                         "backbone.fpn.extra_blocks.p7"}
        assert got == towers | fpn, p.table()
        for name, outs in (("head.classification_head.cls_logits", 27), ("head.regression_head.bbox_reg", 36)):
            entry = next(e for e in p.entries if e.name == name)
            assert entry.fact["out_channels"] == outs and not entry.replaced
            assert entry.reason.startswith("a final predictor"), entry.reason


BY_BOTTLENECK = {"name": "by_bottleneck", "select": {
    "kernel_size": ["3x3"], "groups": [1], "in_channels": {"min": 16}, "out_channels": {"min": 16},
    "regions": ["decoder", "head", "fpn"], "when_no_region_matches": {"after_bottleneck": True},
    "final_predictor": False}}


class FusingClassifier(torch.nn.Module):
    """An HRNet-like classifier: an upsample inside the encoder's multi-resolution fusion, no decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.hi = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.lo = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fuse = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.deep = torch.nn.Conv2d(16, 32, 3, stride=4, padding=1)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x):
        hi = torch.relu(self.hi(x))
        y = hi + torch.nn.functional.interpolate(torch.relu(self.lo(hi)), scale_factor=2.0)
        y = torch.relu(self.deep(torch.relu(self.fuse(y))))
        return self.fc(y.mean((2, 3)))


def test_the_decoder_by_graph_is_what_runs_after_the_bottleneck(case: Case) -> None:
    """``after_bottleneck`` as the region fallback finds the same decoders; a classifier has none."""
    torch.manual_seed(0)
    model, x = case.build().eval(), case.inputs()
    got, table = _plan_selected(model, BY_BOTTLENECK, x)
    assert got == set(case.decoder_only), table


def test_a_classifier_has_nothing_after_its_bottleneck() -> None:
    clf = FusingClassifier().eval()
    xc = torch.randn(1, 3, 32, 32)
    by_upsample = {**BY_BOTTLENECK, "name": "by_upsample",
                   "select": {**BY_BOTTLENECK["select"], "when_no_region_matches": {"downstream_of_upsample": True}}}
    assert _plan_selected(clf, by_upsample, xc)[0] == {"fuse", "deep"}  # downstream of the encoder's upsample
    assert _plan_selected(clf, BY_BOTTLENECK, xc)[0] == set()
    assert _plan_selected(clf, "decoder_only", xc)[0] == set()  # the built-in falls back on the bottleneck


def test_the_report_says_which_capture_was_used_and_why() -> None:
    from dsrewrite import rewrite_and_report
    from dsrewrite.report.table import render_table

    case = next(c for c in CASES if c.name == "diverging_trace")
    model, x = case.build().eval(), case.inputs()
    res = rewrite_and_report(model, "post_concat", example_inputs=x)
    text = render_table(res.report)
    line = next(ln for ln in text.splitlines() if ln.startswith("plan note: capture "))
    assert line.startswith("plan note: capture export: the exported graph reproduces the eager outputs; "
                           "fx rejected: torch.fx traced a graph that is not the model"), line
    assert res.report.capture == "export"


def test_a_forward_that_cannot_run_with_gradients_leaves_final_predictors_unknown() -> None:
    """``.numpy()`` on a tensor that requires grad fails: the eager run is redone without, finals unknown."""

    class Numpy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1))

        def forward(self, x):
            y = self.decoder(x)
            return y * float(y.abs().mean().numpy() > -1)

    model, x = Numpy().eval(), torch.randn(1, 3, 8, 8)
    cap = capture(model, x)
    assert all(f.final_predictor is None and f.calls == 1 for f in cap.facts)
    assert any(n.startswith("final predictors unknown") for n in cap.notes), cap.notes
    got, table = _plan_selected(model, "decoder_only", x)
    assert got == {"decoder.1"}, table  # unknown counts as "not a final predictor"; decoder.0 has 3 inputs
