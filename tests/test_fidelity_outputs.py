"""Fidelity that can be judged: outputs that cannot be compared are said, never counted as a match (issues 13, 14).

A forward returning None or a string, a dict with a variable-length tensor, dataclass records,
and torchvision detectors whose eval outputs are variable-length boxes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import dsrewrite
from dsrewrite.measure.compare import pair_outputs
from dsrewrite.measure.fidelity import compare_outputs
from dsrewrite.report import render_table


def _x(seed: int = 1, shape=(1, 3, 16, 16)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(torch.relu(self.stem(x)))


class ReturnsNone(Body):
    def forward(self, x: torch.Tensor) -> None:
        self.last = self.features(x)
        return None


class ReturnsString(Body):
    def forward(self, x: torch.Tensor):
        y = self.features(x)
        return "positive" if float(y.mean()) > 0 else "negative"


class VariableLength(Body):
    """A dict with a fixed-shape map and a selection whose length depends on the values."""

    def forward(self, x: torch.Tensor) -> dict:
        y = self.features(x)
        return {"map": y, "picked": y[y > 0.05], "tag": None}


@dataclass
class Record:
    logits: torch.Tensor
    hidden: tuple
    name: str


class OnlyPicked(Body):
    """Only a variable-length selection: its length changes with the rewrite (like a detector's box count)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        return y[y > 0.05]


class ReturnsRecord(Body):
    def forward(self, x: torch.Tensor) -> Record:
        y = self.features(x)
        return Record(logits=y, hidden=(y.mean(1), None), name="r")


def _report(model: nn.Module, m: int = 1, recipe="all_3x3", x=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dsrewrite.rewrite_and_report(model.eval(), recipe, example_inputs=_x() if x is None else x,
                                            depth_multiplier=m)


@pytest.mark.parametrize("cls", [ReturnsNone, ReturnsString])
def test_no_tensor_output_is_not_reported_as_a_perfect_match(cls) -> None:
    res = _report(cls())
    fid = res.report.fidelity["example"]
    kind = "None" if cls is ReturnsNone else "a str"
    assert [(n.path, n.why) for n in fid.not_compared] == [("", f"{kind}, not a tensor")]
    # nothing at the output: the modules around the replaced convs ('block') are compared instead
    assert fid.compared == "regions" and fid.regions == ("block",), (fid.compared, fid.regions)
    assert fid.rel_l2 is not None and fid.rel_l2 > 1e-3, "m=1 on random weights cannot be exact"
    text = render_table(res.report)
    assert "modules around the replaced convs (block)" in text and "not compared (1 output leaves)" in text
    d = res.report.to_dict()["fidelity"]["example"]
    assert d["compared"] == "regions" and d["not_compared"][0]["why"] == f"{kind}, not a tensor"


def test_nothing_comparable_and_no_replaced_convs_gives_no_numbers() -> None:
    fid = compare_outputs(ReturnsNone(), ReturnsNone(), _x())
    assert (fid.rel_l2, fid.cosine, fid.max_abs, fid.outputs) == (None, None, None, ())
    assert fid.compared == "outputs" and fid.not_compared[0].why == "None, not a tensor"


def test_dict_with_a_variable_length_tensor_compares_the_rest() -> None:
    original = VariableLength().eval()
    res = _report(original)
    fid = res.report.fidelity["example"]
    assert fid.compared == "outputs" and [o.path for o in fid.outputs] == ["map"]
    reasons = {n.path: n.why for n in fid.not_compared}
    assert reasons["tag"] == "None, not a tensor"
    a, b = original(_x()), res.model.eval()(_x())
    if a["picked"].shape != b["picked"].shape:
        assert reasons["picked"] == f"shape {tuple(a['picked'].shape)} vs {tuple(b['picked'].shape)}"
    # the compared leaf's numbers against a float64 reference
    ref = float((a["map"].double() - b["map"].double()).norm() / a["map"].double().norm())
    assert abs(fid.rel_l2 - ref) < 1e-9 * max(1.0, ref), f"rel L2 {fid.rel_l2!r} vs {ref!r}"


def test_output_whose_length_changes_falls_back_to_the_regions() -> None:
    original = OnlyPicked().eval()
    res = _report(original)  # before: FidelityError with a stride/padding hint, and apply failed
    fid = res.report.fidelity["example"]
    a, b = original(_x()), res.model.eval()(_x())
    assert a.shape != b.shape, "the rewrite did not change the length: the test would not show the fallback"
    assert [(n.path, n.why) for n in fid.not_compared] == [("", f"shape {tuple(a.shape)} vs {tuple(b.shape)}")]
    assert fid.compared == "regions" and fid.regions == ("block",)
    with torch.no_grad():
        fa, fb = original.features(_x()).double(), res.model.features(_x()).double()
    ref = float((fa - fb).norm() / fa.norm())
    assert abs(fid.rel_l2 - ref) < 1e-9 * max(1.0, ref), f"region rel L2 {fid.rel_l2!r} vs direct {ref!r}"


def test_variable_length_selection_reports_its_shapes() -> None:
    p = pair_outputs({"picked": torch.zeros(7), "map": torch.ones(2, 2)}, {"picked": torch.zeros(9), "map": torch.ones(2, 2)})
    assert [(n.path, n.why) for n in p.not_compared] == [("picked", "shape (7,) vs (9,)")]
    assert [path for path, _, _ in p.pairs] == ["map"] and p.mismatch


def test_dataclass_records_pair_by_field_in_the_model_order() -> None:
    res = _report(ReturnsRecord(), m=9)
    fid = res.report.fidelity["example"]
    assert [o.path for o in fid.outputs] == ["logits", "hidden[0]"]
    assert {n.path: n.why for n in fid.not_compared} == {"hidden[1]": "None, not a tensor", "name": "a str, not a tensor"}
    assert fid.rel_l2 < 1e-5, f"full rank rel L2 {fid.rel_l2:.3e}"


# --------------------------------------------------------------------------- torchvision detectors

FPN_RECIPE = {"name": "fpn_convs", "select": {"include": ["backbone.fpn.*"], "in_channels": {"min": 1},
                                              "out_channels": {"min": 1}}}


HEAD_RECIPE = {"name": "head_convs", "select": {"include": ["head.*.conv.*"]}}


def _detector_report(builder, recipe=FPN_RECIPE, **kw):
    torch.manual_seed(0)
    model = builder(weights=None, weights_backbone=None, **kw).eval()
    x = ([torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0))],)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = dsrewrite.rewrite_and_report(model, recipe, example_inputs=x)
    return model, res


def _assert_detector_report(res, region: str = "backbone") -> None:
    prefix = "backbone.fpn." if region == "backbone" else "head."
    assert res.plan.replaced and all(e.name.startswith(prefix) for e in res.plan.replaced)
    fid = res.report.fidelity["example"]
    # random weights: no box passes the score threshold (or the counts differ): the FPN's outputs are compared
    boxes = [n for n in fid.not_compared if n.path.endswith("boxes")]
    assert fid.compared == "regions" and fid.regions == (region,), (fid.compared, fid.regions)
    assert boxes, "the report must say the boxes were not compared"
    assert all(o.path.startswith(f"{region}:") for o in fid.outputs) and fid.rel_l2 is not None
    assert f"modules around the replaced convs ({region})" in render_table(res.report)


def test_fasterrcnn_mobilenet_fpn_rewrite_reports_what_it_compared() -> None:
    tv = pytest.importorskip("torchvision.models.detection")
    model, res = _detector_report(tv.fasterrcnn_mobilenet_v3_large_fpn, min_size=128, max_size=128,
                                  rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)
    _assert_detector_report(res)
    with torch.no_grad():  # the regions compared are the FPN's outputs: check one against a direct run
        img = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0))
        images, _ = model.transform([img])
        feats_a = model.backbone(images.tensors)
        feats_b = res.model.eval().backbone(images.tensors)
    fid = res.report.fidelity["example"]
    key = next(iter(feats_a))
    a, b = feats_a[key].double(), feats_b[key].double()
    ref = float((a - b).norm() / a.norm())
    got = next(o.rel_l2 for o in fid.outputs if o.path == f"backbone:{key}")
    assert abs(got - ref) < 1e-6 * max(1.0, ref), f"{got!r} vs direct {ref!r}"


@pytest.mark.slow
@pytest.mark.parametrize("region", ["backbone", "head"])
def test_retinanet_resnet50_fpn_rewrite_reports_what_it_compared(region: str) -> None:
    tv = pytest.importorskip("torchvision.models.detection")
    recipe = FPN_RECIPE if region == "backbone" else HEAD_RECIPE
    _model, res = _detector_report(tv.retinanet_resnet50_fpn, recipe, min_size=128, max_size=128)
    _assert_detector_report(res, region)
    if region == "head":  # the raw head outputs: the classification logits and box regressions
        assert [o.path for o in res.report.fidelity["example"].outputs] == ["head:cls_logits", "head:bbox_regression"]
