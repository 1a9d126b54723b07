"""order: auto (by MACs, by error, measured) and latency-aware selection in the planner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsrewrite.errors import RecipeError
from dsrewrite.facts import ConvFact
from dsrewrite.planner import plan, separable_macs
from dsrewrite.plan_types import Plan
from dsrewrite.recipe import load_recipe


class _SkipNet(nn.Module):
    """Wide concat -> narrow conv (pw_dw cheaper) and a narrow -> wide conv (dw_pw cheaper)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 64, 3, padding=1)
        self.fuse = nn.Conv2d(128, 16, 3, padding=1)   # C_in 128 > C_out 16
        self.widen = nn.Conv2d(16, 96, 3, padding=1)   # C_in 16 < C_out 96
        self.down = nn.Conv2d(96, 32, 3, stride=2, padding=1)

    def forward(self, x):
        e = F.relu(self.enc(x))
        y = F.relu(self.fuse(torch.cat([e, e], 1)))
        return self.down(F.relu(self.widen(y)))


def _recipe(**replace):
    data = {"name": "t", "select": {"kernel_size": [3], "in_channels": {"min": 16}}, "replace": replace}
    return data


def _fact(e) -> ConvFact:
    d = dict(e.fact)
    for k in ("kernel_size", "stride", "dilation", "input_shape", "output_shape"):
        d[k] = tuple(d[k])
    if isinstance(d["padding"], list):
        d["padding"] = tuple(d["padding"])
    d.pop("shared")
    return ConvFact(**d)


X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_auto_by_macs_never_picks_more_macs():
    torch.manual_seed(0)
    p = plan(_SkipNet(), _recipe(order="auto"), X)
    chosen = {e.name: e.config.order for e in p.replaced}
    assert chosen == {"fuse": "pw_dw", "widen": "dw_pw", "down": "dw_pw"}
    for e in p.replaced:
        f = _fact(e)
        other = "dw_pw" if e.config.order == "pw_dw" else "pw_dw"
        assert separable_macs(f, e.config.order, 1) <= separable_macs(f, other, 1), e.config.note
        assert "fewer MACs" in e.config.note and "measured" not in e.config.note


def test_auto_strided_conv_counts_pointwise_at_input_resolution():
    torch.manual_seed(0)
    p = plan(_SkipNet(), _recipe(order="auto"), X)
    down = next(e for e in p.replaced if e.name == "down")
    f = _fact(down)
    # pw_dw runs its 1×1 before the stride: at 16×16 instead of 8×8
    assert separable_macs(f, "pw_dw", 1) == 32 * 96 * 16 * 16 + 9 * 32 * 8 * 8
    assert separable_macs(f, "dw_pw", 1) == 9 * 96 * 8 * 8 + 96 * 32 * 8 * 8


def test_auto_measured_records_timings_and_says_so():
    torch.manual_seed(0)
    rec = dict(_recipe(order="auto", auto_order="measured"), latency={"rounds": 3, "warmup": 1})
    rec["latency"]["min_speedup"] = 0.0001  # keep everything: this test is about the order
    p = plan(_SkipNet(), rec, X)
    for e in p.replaced:
        assert "(measured)" in e.config.note
        assert {"dw_pw_ms", "pw_dw_ms", "order_ratio", "dense_ms", "separable_ms", "ratio"} <= set(e.measured)
        assert e.config.order == ("pw_dw" if e.measured["order_ratio"] < 1 else "dw_pw"), e.measured


def test_auto_by_error_picks_lower_reconstruction_error_and_shows_macs():
    from dsrewrite.factorize import relative_weight_error

    torch.manual_seed(0)
    net = _SkipNet()
    p = plan(net, _recipe(order="auto", auto_order="error"), X)
    for e in p.replaced:
        w = net.get_submodule(e.name).weight
        errs = {o: relative_weight_error(w, 1, o) for o in ("dw_pw", "pw_dw")}
        assert errs[e.config.order] <= min(errs.values()) + 1e-12
        assert "by weight error" in e.config.note and "MACs" in e.config.note


def test_latency_aware_selection_keeps_dense_when_not_faster_enough():
    torch.manual_seed(0)
    rec = dict(_recipe(), latency={"min_speedup": 1000.0, "rounds": 3, "warmup": 1})
    p = plan(_SkipNet(), rec, X)
    assert not p.replaced
    kept = [e for e in p.entries if e.name in ("fuse", "widen", "down")]
    for e in kept:
        assert e.reason.startswith("kept dense: measured") and "below the required 1000×" in e.reason
        assert e.measured["dense_ms"] > 0 and e.measured["separable_ms"] > 0


def test_latency_aware_selection_records_numbers_when_replacing():
    torch.manual_seed(0)
    rec = dict(_recipe(), latency={"min_speedup": 1e-6, "rounds": 3, "warmup": 1})
    p = plan(_SkipNet(), rec, X)
    assert {e.name for e in p.replaced} == {"fuse", "widen", "down"}
    assert all(e.measured and e.measured["ratio"] > 0 and "measured" in e.reason for e in p.replaced)
    assert Plan.from_json(p.to_json()) == p


@pytest.mark.parametrize("latency,fragment", [
    ({"min_speedup": -1}, "latency.min_speedup"),
    ({"rounds": 0}, "latency.rounds"),
    ({"channels_last": "yes"}, "latency.channels_last"),
    ({"min_speed": 1.1}, "did you mean 'min_speedup'"),
])
def test_latency_section_is_validated(latency, fragment):
    with pytest.raises(RecipeError, match=fragment.replace(".", r"\.")):
        load_recipe(dict(_recipe(), latency=latency))


def test_auto_order_value_is_validated():
    with pytest.raises(RecipeError, match="auto_order"):
        load_recipe(_recipe(order="auto", auto_order="fastest"))
