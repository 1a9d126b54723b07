"""The replacement-kind registry: the built-ins answer for themselves, nothing else compares kind names,
a kind from one test-local file runs the whole data flow, and malformed registrations fail at once."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from dsrewrite.apply import apply_plan
from dsrewrite.calibrate import calibrate
from dsrewrite.capture import capture
from dsrewrite.cli import main
from dsrewrite.deploy import find_conv_bn_pairs, fold_batchnorm
from dsrewrite.errors import PlanError, RecipeError
from dsrewrite.factorize import rank_for_energy, relative_weight_error
from dsrewrite.io import load_rewrite, save_rewrite
from dsrewrite.kinds import (
    KIND_MEMBERS,
    LAYOUT_MEMBERS,
    get_kind,
    kind_names,
    kind_of,
    missing_members,
    register_kind,
    unregister_kind,
)
from dsrewrite.lstsq import gather_patches
from dsrewrite.macs import count_costs, layer_costs
from dsrewrite.plan_types import LayerConfig, Plan
from dsrewrite.planner import plan
from dsrewrite.recipe import load_recipe
from dsrewrite.recipe.schema import order_choices, order_json_schema
from dsrewrite.report import build_report

from toy_kind import GroupedDwPw, GroupedDwPwKind, ToyNet, block_diagonal

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dsrewrite"
BUILTIN_KINDS = ("dw_pw", "pw_dw")


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


# --------------------------------------------------------------------------------------
# (1) kind names are compared nowhere outside dsrewrite/kinds/
# --------------------------------------------------------------------------------------
def _kind_constants(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and n.value in BUILTIN_KINDS]


def kind_comparisons(source: str, filename: str) -> list[str]:
    """``file:line: code`` of every comparison or ``match`` case against a built-in kind's name."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Compare) and _kind_constants(node):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.match_case) and _kind_constants(node.pattern):
            found.append(f"{filename}:{node.pattern.lineno}: case {ast.unparse(node.pattern)}")
    return found


def test_the_checker_finds_comparisons_and_matches() -> None:
    src = ("a = x == 'dw_pw'\nb = 'pw_dw' != y\nc = z in ('dw_pw', 'q')\nd = {'dw_pw': 1}[k]\n"
           "match k:\n    case 'pw_dw':\n        pass\n")
    hits = kind_comparisons(src, "t.py")
    assert [h.split(":")[1] for h in hits] == ["1", "2", "3", "6"], hits  # the dict lookup is data


def test_kind_names_are_compared_only_inside_kinds() -> None:
    files = [p for p in PACKAGE.rglob("*.py") if "kinds" not in p.relative_to(PACKAGE).parts]
    assert len(files) > 25 and any(p.name == "calibrate.py" for p in files)
    hits = [h for p in sorted(files) for h in kind_comparisons(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert not hits, "kind names compared outside dsrewrite/kinds/ (ask the kind object instead):\n" + "\n".join(hits)


# --------------------------------------------------------------------------------------
# the registry feeds recipes, the schema and the CLI
# --------------------------------------------------------------------------------------
def test_schema_file_order_is_generated_from_the_registry() -> None:
    path = PACKAGE / "recipe" / "recipe.schema.json"
    got = json.loads(path.read_text(encoding="utf-8"))["$defs"]["replaceKeys"]["properties"]["order"]
    want = order_json_schema()
    assert got == want, (
        f"{path} is out of date with the registry: set $defs.replaceKeys.properties.order to\n"
        + json.dumps(want, ensure_ascii=False)
    )
    assert want["enum"] == [*BUILTIN_KINDS, "auto"]


def test_builtins_are_registered_in_order_and_complete() -> None:
    assert kind_names() == BUILTIN_KINDS
    for name in BUILTIN_KINDS:
        kind = get_kind(name)
        assert kind.name == name and missing_members(kind) == ()
        block = kind.build(nn.Conv2d(4, 6, 3), LayerConfig(order=name))
        assert kind_of(block) is kind and missing_members(kind.layout(block), LAYOUT_MEMBERS) == ()
    assert kind_of(nn.Conv2d(4, 6, 3)) is None


@pytest.mark.parametrize("name", BUILTIN_KINDS)
def test_builtin_kind_costs_and_spectrum_match_the_built_block(name: str) -> None:
    torch.manual_seed(0)
    kind = get_kind(name)
    net = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1))
    x = torch.randn(2, 16, 12, 10)
    (f,) = capture(net, x).facts
    for m in (1, 3):
        light = nn.Sequential(kind.build(net[0], LayerConfig(order=name, depth_multiplier=m)))
        counted = layer_costs(light, count_costs(light, x), ["0"])["0"]
        assert (kind.macs(f, m), kind.params(f, m)) == (counted.macs, counted.params), (name, m)
    w = net[0].weight
    assert kind.weight_error(w, 2) == relative_weight_error(w, 2, name)
    assert kind.rank_for_energy(w, 0.8) == rank_for_energy(w, 0.8, name)


@pytest.mark.parametrize("name", BUILTIN_KINDS)
def test_builtin_layout_round_trips_the_block(name: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, padding=1)
    block = get_kind(name).build(conv, LayerConfig(order=name, depth_multiplier=9))
    lay = get_kind(name).layout(block)
    first, last, bias = lay.current()
    dense = lay.dense(first, last)
    err = _max_err(dense.float(), conv.weight.detach().reshape(7, 5, 9))
    assert err < 1e-5, f"dense kernel of the full-rank {name} block differs from the conv by {err}"
    w, b = lay.unpack_last(lay.pack_last(last, bias), True)
    assert torch.equal(w, last) and torch.equal(b, bias)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    lay.write(first, last, bias)
    assert all(torch.allclose(before[k], v) for k, v in block.state_dict().items())
    x = torch.randn(1, 5, 6, 6)
    pos = torch.tensor([[0, 1, 2], [0, 5, 0]])
    p = gather_patches(x, pos, 3, padding=1).reshape(2, -1).to(torch.float64)
    via_patches = lay.last_features_from_patches(p, first)
    z = block.first_stage(x).to(torch.float64)
    err = _max_err(via_patches, lay.last_features(z, pos))
    assert err < 1e-5, f"{name}: last-stage features from patches vs from the first stage differ by {err}"


def test_order_choices_follow_the_registry_everywhere(toy) -> None:
    assert order_choices() == (*BUILTIN_KINDS, toy.name, "auto")
    assert order_json_schema()["enum"] == [*BUILTIN_KINDS, toy.name, "auto"]
    assert load_recipe({"replace": {"order": toy.name}}).replace.order == toy.name
    r = CliRunner().invoke(main, ["apply", "--help"])
    assert r.exit_code == 0 and toy.name in r.output, r.output


def test_unknown_kind_is_refused_with_the_registered_names() -> None:
    with pytest.raises(RecipeError, match=r"valid options: 'dw_pw', 'pw_dw', 'auto' \(did you mean 'dw_pw'\?\)"):
        load_recipe({"replace": {"order": "dw_pw_g3"}})
    net = nn.Sequential(nn.Conv2d(8, 8, 3))
    p = Plan.from_json(json.dumps({"entries": [{"name": "0", "action": "replace", "reason": "t",
                                                "config": {"order": "dw_pw_g2", "depth_multiplier": 1}}],
                                   "recipe": "t", "capture": "fx"}))
    with pytest.raises(PlanError, match=r"order 'dw_pw_g2' is not a registered replacement kind.*register_kind"):
        apply_plan(net, p)
    assert type(net[0]) is nn.Conv2d
    r = CliRunner().invoke(main, ["plan", "x.pt", "--recipe", "all_3x3", "--order", "dw_pw_g2"])
    assert r.exit_code == 2 and "'dw_pw_g2' is not one of" in r.output, r.output


# --------------------------------------------------------------------------------------
# (3) malformed registrations fail at once, with the reason
# --------------------------------------------------------------------------------------
def test_duplicate_name_is_refused() -> None:
    with pytest.raises(ValueError, match=r"a replacement kind named 'dw_pw' is already registered"):
        register_kind(get_kind("dw_pw"))

    class Clash(GroupedDwPwKind):
        name = "pw_dw"

    with pytest.raises(ValueError, match=r"'pw_dw' is already registered"):
        register_kind(Clash())
    assert kind_names() == BUILTIN_KINDS and type(get_kind("pw_dw")).__name__ == "PwDwKind"


def test_kind_missing_members_is_refused_naming_them() -> None:
    class Partial:
        name = "partial"
        description = "lacks most of the protocol"
        auto = False

        def build(self, conv, config, *, init=None, name=""):
            return conv

    with pytest.raises(TypeError) as info:
        register_kind(Partial())  # type: ignore[arg-type]
    msg = str(info.value)
    assert msg.startswith("Partial is not a replacement kind: it lacks hoist_refusal, check, macs, params"), msg
    assert "layout" in msg.split("(")[0] and "build" not in msg.split("(")[0], msg
    assert all(m in msg for m in KIND_MEMBERS)
    assert "partial" not in kind_names()


@pytest.mark.parametrize("name, error, words", [
    ("auto", ValueError, "cannot name a replacement kind"),
    ("dw-pw", ValueError, "cannot name a replacement kind"),
    (3, TypeError, "name must be a str"),
])
def test_bad_kind_names_are_refused(name, error, words) -> None:
    kind = GroupedDwPwKind()
    kind.name = name  # type: ignore[assignment]
    with pytest.raises(error, match=words):
        register_kind(kind)
    assert kind_names() == BUILTIN_KINDS


def test_unregister_unknown_kind_names_the_registered_ones() -> None:
    with pytest.raises(KeyError, match=r"no replacement kind 'nope'; registered: 'dw_pw', 'pw_dw'"):
        unregister_kind("nope")


# --------------------------------------------------------------------------------------
# (2) a toy kind from one test-local file runs plan → apply → calibrate → report → save → load
# --------------------------------------------------------------------------------------
@pytest.fixture
def toy():
    kind = register_kind(GroupedDwPwKind())
    try:
        yield kind
    finally:
        unregister_kind(kind.name)
    assert kind_names() == BUILTIN_KINDS


def _toy_net(block_diag: bool) -> ToyNet:
    torch.manual_seed(0)
    net = ToyNet()
    bn = net.body[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
        if block_diag:
            w = net.body[0].weight
            w.copy_(block_diagonal(w))
    return net.eval()


def _recipe(kind: str, m: int) -> dict:
    return {"name": "toy", "select": {"in_channels": {"min": 8}, "kernel_size": ["3x3"]},
            "replace": {"order": kind, "depth_multiplier": m}}


def test_toy_kind_through_the_whole_data_flow(toy, tmp_path: Path) -> None:
    net = _toy_net(block_diag=True)
    x = torch.randn(2, 3, 12, 12)
    batches = [torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    # plan: the toy kind's name is recorded, its MACs used
    p = plan(net, _recipe(toy.name, 9), x)
    assert [(e.name, e.config.order) for e in p.replaced] == [("body.0", toy.name)]
    assert json.loads(p.to_json())["entries"][1]["config"]["order"] == toy.name

    # apply: the toy's block, exact at full rank on a block-diagonal kernel
    light = apply_plan(net, p)
    assert type(light.body[0]) is GroupedDwPw and type(net.body[0]) is nn.Conv2d
    assert kind_of(light.body[0]) is toy and light.body[0].pointwise.groups == 2
    with torch.no_grad():
        err = _max_err(light(x), net(x))
    assert err < 1e-5, f"toy kind at full rank vs the dense conv: max error {err}"

    # calibrate: the layer is fitted (last stage, through BN + ReLU) and stays exact
    res = calibrate(net, light, batches)
    (rec,) = res.layers
    assert (rec.name, rec.order, rec.depth_multiplier, rec.method) == ("body.0", toy.name, 9, "last_stage"), rec
    assert rec.rel_error_after <= rec.rel_error_before + 1e-9 and rec.rel_error_after < 1e-5, rec
    assert "kind dw_pw_g2 has no joint refit" in rec.note, rec.note
    with torch.no_grad():
        err = _max_err(light(x), net(x))
    assert err < 1e-4, f"toy kind after calibration vs the dense conv: max error {err}"

    # report: MACs and params after are the kind's own counts
    rep = build_report(net, light, p, x)
    row = next(r for r in rep.layers if r.name == "body.0")
    f = next(c for c in capture(net, x).facts if c.name == "body.0")
    assert row.config["order"] == toy.name and row.kind_after == "GroupedDwPw"
    assert (row.after.macs, row.after.params) == (toy.macs(f, 9), toy.params(f, 9)), row
    assert json.loads(json.dumps(rep.to_dict()))["layers"][1]["config"]["order"] == toy.name

    # save → load: the plan file names the kind, the reload reproduces the outputs exactly
    weights, plan_file = save_rewrite(light, p, tmp_path / "toy.pt")
    assert json.loads(plan_file.read_text())["entries"][1]["config"]["order"] == toy.name
    again = load_rewrite(ToyNet(), plan_file, weights).eval()
    with torch.no_grad():
        err = _max_err(again(x), light(x))
    assert type(again.body[0]) is GroupedDwPw and err == 0.0, f"reloaded toy model differs by {err}"

    # deploy: a BN after the toy block folds into the stage the kind names
    assert [(q.conv, q.bn) for q in find_conv_bn_pairs(light)] == [("body.0.pointwise", "body.1")]
    with torch.no_grad():
        err = _max_err(fold_batchnorm(light)(x), light(x))
    assert err < 1e-5, f"BN folded into the toy block's pointwise: max error {err}"

    # unregistered, a plan naming the kind no longer applies (the fixture unregisters again)
    unregister_kind(toy.name)
    try:
        with pytest.raises(PlanError, match="not a registered replacement kind"):
            load_rewrite(ToyNet(), plan_file, weights)
    finally:
        register_kind(toy)


def test_toy_kind_is_as_good_as_expected_on_a_dense_kernel(toy) -> None:
    """On a kernel with off-diagonal blocks the toy at full rank is exactly the block-diagonal conv,
    its weight error is the off-diagonal share, and calibration at a low rank lowers the error."""
    net = _toy_net(block_diag=False)
    conv = net.body[0]
    x = torch.randn(2, 8, 10, 10)
    block = toy.build(conv, LayerConfig(order=toy.name, depth_multiplier=9))
    with torch.no_grad():
        want = F.conv2d(x, block_diagonal(conv.weight), conv.bias, padding=1)
        err = _max_err(block(x), want)
    assert err < 1e-5, f"full-rank toy block vs the block-diagonal conv: max error {err}"
    w = conv.weight.detach().double()
    off = float(((w - block_diagonal(w)) ** 2).sum() / (w * w).sum()) ** 0.5
    assert math.isclose(toy.weight_error(conv.weight, 9), off, rel_tol=1e-9)
    assert toy.weight_error(conv.weight, 1) > off and toy.rank_for_energy(conv.weight, 1.0) == 9

    p = plan(net, _recipe(toy.name, 1), torch.randn(1, 3, 12, 12))
    light = apply_plan(net, p)
    batches = [torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    (rec,) = calibrate(net, light, batches).layers
    assert rec.steps[:1] == ("last",) and rec.rel_error_after < rec.rel_error_before, rec
    assert rec.act_error_after is not None and rec.act_error_after <= rec.act_error_before + 1e-12, rec


def test_auto_chooses_among_the_registered_kinds_that_take_part() -> None:
    """``order: auto`` reads the registry: a third kind that takes part is weighed with the built-ins."""

    class AutoToy(GroupedDwPwKind):
        auto = True

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 16, 8, 8)
    rec = {"select": {"in_channels": {"min": 8}}, "replace": {"order": "auto", "depth_multiplier": 1}}
    (before,) = plan(net, rec, x).replaced
    assert before.config.order == "dw_pw", before.config.note  # the built-ins alone: dw_pw is cheaper here
    kind = register_kind(AutoToy())
    try:
        (e,) = plan(net, rec, x).replaced
        (f,) = capture(net, x).facts
        macs = {n: get_kind(n).macs(f, 1) for n in ("dw_pw", "pw_dw", kind.name)}
        assert e.config.order == kind.name == min(macs, key=macs.get), (macs, e.config.note)
        assert e.config.note == (f"order auto: dw_pw_g2 has fewer MACs ({macs[kind.name]:,} vs "
                                 f"{macs['dw_pw']:,} for dw_pw, {macs['pw_dw']:,} for pw_dw)")
        timed = {**rec, "replace": {**rec["replace"], "auto_order": "measured"}}
        (t,) = plan(net, timed, x).replaced
        assert {"dw_pw_ms", "pw_dw_ms", "dw_pw_g2_ms", "pw_dw_ratio", "dw_pw_g2_ratio"} == set(t.measured), t.measured
        ratios = {"dw_pw": 1.0, "pw_dw": t.measured["pw_dw_ratio"], kind.name: t.measured["dw_pw_g2_ratio"]}
        assert t.config.order == min(ratios, key=ratios.get), (ratios, t.config.note)
    finally:
        unregister_kind(kind.name)


def test_a_layout_missing_members_is_named_when_calibration_asks(toy) -> None:
    class Half:  # a layout with only the weights
        def __init__(self, block):
            self.block = block

        def current(self):
            raise AssertionError("not reached")

    net = _toy_net(block_diag=True)
    light = apply_plan(net, plan(net, _recipe(toy.name, 1), torch.randn(1, 3, 12, 12)))
    before = {k: v.clone() for k, v in light.state_dict().items()}
    toy.layout = Half  # the instance's member, for this test's registration only
    with pytest.raises(TypeError, match=r"kind 'dw_pw_g2': layout\(\) returned a Half that lacks linear, joint_dim"):
        calibrate(net, light, [torch.randn(2, 3, 12, 12)])
    assert all(torch.equal(before[k], v) for k, v in light.state_dict().items())
