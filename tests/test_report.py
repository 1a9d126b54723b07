"""build_report and its renderings; compare_latency (structure only: no absolute time thresholds)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsrewrite.errors import InputShapeError, OutputError, PlanError, UsageError
from dsrewrite.facts import ConvFact
from dsrewrite.latency import compare_latency
from dsrewrite.layers import DepthwiseSeparableConv2d
from dsrewrite.macs import count_costs, count_params
from dsrewrite.plan_types import LayerConfig, Plan, PlanEntry
from dsrewrite.report import (
    PlotUnavailableError,
    build_plan_report,
    build_report,
    render_markdown,
    render_table,
    save_plot,
    save_report,
)

PNG = b"\x89PNG\r\n\x1a\n"


class Small(nn.Module):
    """Regions stem / body / head; a dense-prediction output (N, 4, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
        )
        self.head = nn.Conv2d(16, 4, 1)
        self.scale = nn.Parameter(torch.ones(1))  # a parameter on the root: region '(root)'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.body(self.stem(x)))) * self.scale


def _fact(model: nn.Module, name: str, x: torch.Tensor) -> dict:
    conv = model.get_submodule(name)
    mod = count_costs(model, x).modules[name]
    return ConvFact(
        name=name, cls="torch.nn.modules.conv.Conv2d", conv_type="Conv2d", plain=True,
        in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        bias=conv.bias is not None, padding_mode=conv.padding_mode, dtype="float32", device="cpu",
        region=name.split(".")[0], calls=1, input_shape=mod.input_shape, output_shape=mod.output_shape,
    ).to_dict()


def _rewrite(model: nn.Module, names: list[str], m: int) -> nn.Module:
    new = copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = new.get_submodule(parent_name)
        setattr(parent, child, DepthwiseSeparableConv2d.from_conv(getattr(parent, child), depth_multiplier=m))
    return new


def _plan(model: nn.Module, x: torch.Tensor, replace: list[str], skip: list[str], m: int = 1) -> Plan:
    entries = [PlanEntry(n, "replace", "3×3 in 'body'", LayerConfig(depth_multiplier=m), fact=_fact(model, n, x))
               for n in replace]
    entries += [PlanEntry(n, "skip", f"region {n.split('.')[0]!r} not selected", fact=_fact(model, n, x)) for n in skip]
    return Plan(entries=tuple(entries), recipe="hand_made", capture="fx", input_shape=tuple(x.shape))


@pytest.fixture(scope="module")
def setup() -> tuple:
    model = Small().eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    replace, skip = ["body.0", "body.3"], ["stem"]
    rewritten = _rewrite(model, replace, m=1)
    plan = _plan(model, x, replace, skip)
    return model, rewritten, plan, x, build_report(model, rewritten, plan, x)


def test_totals_are_layers_plus_other_and_regions_sum(setup: tuple) -> None:
    model, rewritten, _, x, rep = setup
    for side in ("before", "after"):
        tot, other = getattr(rep, f"totals_{side}"), getattr(rep, f"other_{side}")
        layers = [getattr(r, side) for r in rep.layers]
        assert tot.macs == sum(c.macs for c in layers) + other.macs, side
        assert tot.params == sum(c.params for c in layers) + other.params, side
        assert tot.macs == sum(getattr(g, side).macs for g in rep.regions), side
        assert tot.params == sum(getattr(g, side).params for g in rep.regions), side
    assert rep.totals_before.params == count_params(model) and rep.totals_after.params == count_params(rewritten)
    # hand-computed: Conv2d(16,16,3) on 64×64 dense vs dw (16·9) + pw (16·16) per pixel
    hw = 64 * 64
    body0 = rep.layers[0]
    assert (body0.name, body0.replaced) == ("body.0", True)
    assert body0.before.macs == hw * 16 * 16 * 9 and body0.after.macs == hw * (16 * 9 + 16 * 16)
    assert body0.before.params == 16 * 16 * 9 and body0.after.params == 16 * 9 + 16 * 16
    assert rep.layers[1].after.params == 16 * 9 + 16 * 16 + 16  # bias moves to the pointwise stage
    stem = rep.layers[2]
    assert not stem.replaced and stem.before == stem.after and stem.reason == "region 'stem' not selected"
    assert [g.name for g in rep.regions] == ["stem", "body", "head", "(root)"]
    assert rep.regions[-1].before.params == 1 and rep.regions[0].before == rep.regions[0].after
    assert rep.other_before.macs == hw * 4 * 16  # the stem is a (skipped) layer; only the head is "other"
    assert rep.other_before.params == 4 * 16 + 4 + 16 * 2 + 1  # head, BatchNorm, root scale
    assert body0.input_shape == (1, 16, 64, 64) and body0.region == "body"


def test_reductions_and_json_schema(setup: tuple) -> None:
    _, _, _, _, rep = setup
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["schema_version"] == 2 and d["kind"] == "rewrite" and d["capture"] == "fx" and d["recipe"] == "hand_made"
    tb, ta = d["totals"]["before"], d["totals"]["after"]
    for k in ("params", "macs", "flops"):
        assert isinstance(tb[k], int) and isinstance(ta[k], int)
    assert tb["flops"] == 2 * tb["macs"] and ta["flops"] == 2 * ta["macs"]
    red = d["totals"]["reduction"]["macs"]
    assert red["factor"] == pytest.approx(tb["macs"] / ta["macs"], rel=1e-12)
    assert red["percent"] == pytest.approx(100 * (tb["macs"] - ta["macs"]) / tb["macs"], rel=1e-12)
    assert {r["name"] for r in d["regions"]} == {"stem", "body", "head", "(root)"}
    layer_keys = {"name", "replaced", "reason", "before", "after", "region", "config", "input_shape", "output_shape"}
    for layer in d["layers"]:
        assert layer_keys <= set(layer), layer_keys - set(layer)
        for side in ("before", "after"):
            assert {"macs", "params", "flops"} <= set(layer[side])
    assert d["layers"][0]["config"]["depth_multiplier"] == 1 and d["layers"][2]["config"] is None
    assert d["counts"] == {"replaced": 2, "skipped": 1}
    assert "not counted" in d["not_counted"] and "interpolate" in d["not_counted"]
    assert d["units"]["flops"] == "FLOPs = 2×MACs"
    assert d["fidelity"]["example"]["rel_l2"] > 0 and d["fidelity"]["calibration"] is None
    assert d["latency"] is None


def test_markdown_table_and_save(setup: tuple, tmp_path) -> None:
    _, _, _, _, rep = setup
    md = render_markdown(rep)
    assert "| layer | region |" in md and "FLOPs = 2×MACs" in md and "not counted" in md
    for r in rep.layers:
        assert f"| `{r.name}` |" in md
    assert f"| **total** | {rep.totals_before.params:,} | {rep.totals_after.params:,} |" in md
    table = render_table(rep)
    assert "body.0" in table and "FLOPs = 2×MACs" in table and f"{rep.totals_after.macs:,}" in table
    assert save_report(rep, tmp_path / "r.md").read_text(encoding="utf-8") == md
    assert json.loads((save_report(rep, tmp_path / "r.json")).read_text()) == json.loads(
        json.dumps(rep.to_dict()))
    assert save_report(rep, tmp_path / "r.txt").read_text(encoding="utf-8").startswith("dsrewrite rewrite report")
    with pytest.raises(OutputError, match=r"suffix '\.jsn'.*did you mean '\.json'"):
        save_report(rep, tmp_path / "r.jsn")
    with pytest.raises(OutputError, match="does not exist"):
        save_report(rep, tmp_path / "missing" / "r.json")


def test_png_plot(setup: tuple, tmp_path, monkeypatch) -> None:
    _, _, _, _, rep = setup
    path = save_plot(rep, tmp_path / "macs.png")
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 1000
    with pytest.raises(OutputError, match=r"must end in \.png"):
        save_plot(rep, tmp_path / "macs.jpg")
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails
    with pytest.raises(PlotUnavailableError, match="pip install"):
        save_plot(rep, tmp_path / "other.png")
    assert not (tmp_path / "other.png").exists()


def test_design_note_numbers_in_report(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1, bias=False))
    x = torch.randn(1, 64, 56, 56)
    rewritten = _rewrite(model, ["0"], m=1)
    rep = build_report(model, rewritten, _plan(model, x, ["0"], []), x)
    d = rep.to_dict()
    assert d["totals"]["before"] == {"params": 73_728, "macs": 231_211_008, "flops": 462_422_016}
    assert d["totals"]["after"] == {"params": 8_768, "macs": 27_496_448, "flops": 54_992_896}
    assert d["layers"][0]["before"]["macs"] == 231_211_008 and d["layers"][0]["after"]["params"] == 8_768
    md, table = render_markdown(rep), render_table(rep)
    for number in ("231,211,008", "27,496,448", "73,728", "8,768"):
        assert number in md and number in table, number


def test_fidelity_exact_at_full_rank_lossy_at_rank_one(setup: tuple) -> None:
    model, _, _, x, rep1 = setup
    replace = ["body.0", "body.3"]
    calib = [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    rep9 = build_report(model, _rewrite(model, replace, m=9), _plan(model, x, replace, [], m=9), x,
                        calibration_inputs=calib)
    for key in ("example", "calibration"):
        f = rep9.fidelity[key]
        assert f.rel_l2 < 1e-5, f"m=9 {key}: rel L2 {f.rel_l2:.3e}, max abs {f.max_abs:.3e}"
        assert f.argmax_agreement == 1.0
    assert rep9.fidelity["calibration"].batches == 2
    assert rep1.fidelity["example"].rel_l2 > 1e-3 and rep1.fidelity["example"].cosine < 1.0
    assert 0.0 <= rep1.fidelity["example"].argmax_agreement <= 1.0
    assert "fidelity on the calibration inputs (2 batches)" in render_table(rep9)


def test_model_only_report(setup: tuple) -> None:
    model, _, plan, x, _ = setup
    for rep in (build_report(model, model, plan, x), build_plan_report(model, plan, x)):
        assert rep.kind == "model" and rep.totals_before == rep.totals_after
        assert all(r.before == r.after for r in rep.layers)
        assert rep.fidelity == {} and rep.latency == {} and rep.warnings == ()
        assert "no rewrite" in render_table(rep)
        assert rep.to_dict()["totals"]["reduction"]["macs"] == {"factor": 1.0, "percent": 0.0}


def test_benchmark_fields(setup: tuple) -> None:
    model, rewritten, plan, x, _ = setup
    rep = build_report(model, rewritten, plan, x, benchmark=True, benchmark_rounds=2, benchmark_warmup=0)
    lat = rep.to_dict()["latency"]
    assert set(lat) == {"eager_nchw", "channels_last", "mac_ratio"}
    assert lat["mac_ratio"] == pytest.approx(rep.totals_after.macs / rep.totals_before.macs)
    assert lat["eager_nchw"]["rounds"] == 2 and lat["eager_nchw"]["ratio"] > 0
    assert lat["channels_last"]["channels_last"] is True and lat["channels_last"]["median_b_ms"] > 0
    text = render_table(rep)
    assert "latency eager NCHW" in text and "latency channels_last" in text and "MAC ratio" in text


def test_models_unchanged(setup: tuple) -> None:
    model, rewritten, plan, x, _ = setup
    model.train()
    rewritten.body[1].train()
    states = [copy.deepcopy(m.state_dict()) for m in (model, rewritten)]
    flags = [[mod.training for mod in m.modules()] for m in (model, rewritten)]
    try:
        build_report(model, rewritten, plan, x, calibration_inputs=[x], benchmark=True, benchmark_rounds=1,
                     benchmark_warmup=0)
        for m, sd, fl in zip((model, rewritten), states, flags):
            assert [mod.training for mod in m.modules()] == fl
            for k, v in m.state_dict().items():
                assert torch.equal(v, sd[k]), k  # BN running stats untouched
            assert all(p.is_contiguous() for p in m.parameters())  # not converted to channels_last
    finally:
        model.eval()
        rewritten.eval()


def test_plan_names_unknown_layer(setup: tuple) -> None:
    model, rewritten, _, x, _ = setup
    bad = Plan(entries=(PlanEntry("bodyy.0", "skip", "typo"),), recipe="r", capture="fx")
    with pytest.raises(PlanError, match=r"no submodule 'bodyy\.0' in Small \(did you mean 'body\.0'\?\)"):
        build_report(model, rewritten, bad, x)


def test_warnings_functional_conv_and_unapplied_plan() -> None:
    class WithFunctional(Small):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(super().forward(x), self.head.weight[:, :4])

    model = WithFunctional().eval()
    x = torch.randn(1, 3, 16, 16)
    plan = _plan(model, x, ["body.0"], [])
    rep = build_report(model, copy.deepcopy(model), plan, x)  # the plan was never applied
    assert any(w.startswith("both models: FlopCounterMode found") for w in rep.warnings), rep.warnings
    assert any("plan says replace 'body.0' but the rewritten model still holds a Conv2d" in w
               for w in rep.warnings), rep.warnings
    assert "warning: both models: FlopCounterMode found" in render_table(rep)


# --------------------------------------------------------------------------------------
# latency (structure only)
# --------------------------------------------------------------------------------------
def test_latency_structure_and_self_ratio() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1))
    x = torch.randn(1, 16, 32, 32)
    r = compare_latency(model, model, x, rounds=9, warmup=2)
    assert r.rounds == 9 and len(r.times_a_ms) == len(r.times_b_ms) == 9
    assert all(t > 0 for t in r.times_a_ms + r.times_b_ms)
    assert 0.5 < r.ratio < 2.0, f"a model against itself: ratio {r.ratio:.3f} (times {r.times_a_ms}, {r.times_b_ms})"
    assert r.device == "cpu" and not r.channels_last and r.speedup == pytest.approx(1 / r.ratio)
    assert set(r.to_dict()) == {"median_a_ms", "median_b_ms", "ratio", "rounds", "warmup", "device", "channels_last"}


def test_latency_leaves_caller_models_unchanged() -> None:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).train()
    b = _rewrite(nn.Sequential(nn.Conv2d(3, 8, 3)), ["0"], m=1).train()
    x = torch.randn(2, 3, 16, 16)
    before = [(copy.deepcopy(m.state_dict()), [p.data_ptr() for p in m.parameters()]) for m in (a, b)]
    r = compare_latency(a, b, x, rounds=3, warmup=1, channels_last=True)
    assert r.channels_last and r.ratio > 0
    for m, (sd, ptrs) in zip((a, b), before):
        assert m.training and all(mod.training for mod in m.modules())
        assert [p.data_ptr() for p in m.parameters()] == ptrs
        assert all(p.is_contiguous() for p in m.parameters())
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    assert x.is_contiguous()


def test_latency_rejects_bad_arguments() -> None:
    m = nn.Linear(4, 4)
    with pytest.raises(UsageError, match="rounds must be an int >= 1, got 0"):
        compare_latency(m, m, torch.randn(1, 4), rounds=0)
    with pytest.raises(InputShapeError, match=r"channels_last needs a 4-d .* got shape \(1, 4\)"):
        compare_latency(m, m, torch.randn(1, 4), channels_last=True)
    with pytest.raises(InputShapeError, match="failed to run on example input"):
        compare_latency(m, m, torch.randn(1, 5), rounds=1)
