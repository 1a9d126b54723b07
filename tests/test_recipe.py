"""Recipes: loading and validation (built-ins, JSON Schema, bad recipes), selection, records.

Facts are built by hand (no capture, no models), so the whole file runs in about a second.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from dsrewrite.errors import RecipeError
from dsrewrite.facts import ConvFact
from dsrewrite.layers.dsconv import INITS, MID_ACTS, MID_NORMS
from dsrewrite.recipe import (
    NamePattern,
    Range,
    ReplaceSpec,
    Selection,
    builtin_recipe_path,
    builtin_recipes,
    load_recipe,
    select,
)
from dsrewrite.recipe.load import OVERRIDE_KEYS, REPLACE_KEYS, SELECT_KEYS, TOP_KEYS
from dsrewrite.recipe.schema import ORDERS

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = ROOT / "dsrewrite" / "recipe" / "recipe.schema.json"
BUILTINS = ["all_3x3", "all_3x3x3", "decoder_high_res", "decoder_only", "post_concat", "post_upsample"]
EXAMPLES = sorted((ROOT / "recipes").glob("*.yaml"))


# --- hand-built facts -----------------------------------------------------------------------
def fact(name: str = "decoder.blocks.0.conv1", **kw: Any) -> ConvFact:
    """A 3×3 64→64 dense Conv2d in region ``decoder`` that ran once; any field overridable."""
    k = kw.pop("k", 3)
    base: dict[str, Any] = dict(
        name=name, cls="torch.nn.modules.conv.Conv2d", conv_type="Conv2d", plain=True,
        in_channels=64, out_channels=64, kernel_size=(k, k), stride=(1, 1), padding=(k // 2, k // 2),
        dilation=(1, 1), groups=1, bias=False, padding_mode="zeros", dtype="float32", device="cpu",
        region=name.split(".")[0], calls=1, input_shape=(1, 64, 16, 16), output_shape=(1, 64, 16, 16),
        output_stride=4.0, after_concat=False, after_upsample=False, downstream_of_upsample=True,
    )
    base.update(kw)
    return ConvFact(**base)


def smp_unet_resnet18_facts(classes: int = 2, graph: bool = True) -> list[ConvFact]:
    """The 31 conv facts of smp ``Unet("resnet18", classes=2)`` (names, channels, strides as smp builds them)."""
    out = [fact("encoder.conv1", k=7, in_channels=3, out_channels=64, stride=(2, 2), output_stride=2.0,
                downstream_of_upsample=False)]
    chans = [64, 64, 128, 256, 512]
    for layer in range(1, 5):
        cin, cout = chans[layer - 1], chans[layer]
        os_ = 4.0 * 2 ** (layer - 1)
        for block in range(2):
            first = block == 0 and layer > 1
            out.append(fact(f"encoder.layer{layer}.{block}.conv1", in_channels=cin if block == 0 else cout,
                            out_channels=cout, stride=(2, 2) if first else (1, 1), output_stride=os_,
                            downstream_of_upsample=False))
            out.append(fact(f"encoder.layer{layer}.{block}.conv2", in_channels=cout, out_channels=cout,
                            output_stride=os_, downstream_of_upsample=False))
            if first:
                out.append(fact(f"encoder.layer{layer}.0.downsample.0", k=1, in_channels=cin, out_channels=cout,
                                stride=(2, 2), output_stride=os_, downstream_of_upsample=False))
    dec_in, skips, dec_out = [512, 256, 128, 64, 32], [256, 128, 64, 64, 0], [256, 128, 64, 32, 16]
    for b in range(5):
        os_ = 16.0 / 2 ** b
        out.append(fact(f"decoder.blocks.{b}.conv1.0", in_channels=dec_in[b] + skips[b], out_channels=dec_out[b],
                        output_stride=os_, after_concat=skips[b] > 0, after_upsample=True))
        out.append(fact(f"decoder.blocks.{b}.conv2.0", in_channels=dec_out[b], out_channels=dec_out[b],
                        output_stride=os_))
    out.append(fact("segmentation_head.0", in_channels=16, out_channels=classes, output_stride=1.0, bias=True))
    if not graph:
        out = [dataclasses.replace(f, after_concat=None, after_upsample=None, downstream_of_upsample=None)
               for f in out]
    return out


def chosen(recipe: Any, facts: list[ConvFact]) -> list[str]:
    return [s.fact.name for s in select(load_recipe(recipe), facts) if s.selected]


def one(recipe: Any, f: ConvFact) -> Selection:
    (s,) = select(load_recipe(recipe), [f])
    return s


# --- built-ins and the JSON Schema ------------------------------------------------------------
def test_builtins_are_the_documented_six_and_each_loads() -> None:
    assert sorted(builtin_recipes()) == BUILTINS
    for name, desc in builtin_recipes().items():
        r = load_recipe(name)
        assert r.name == name and r.source == f"builtin:{name}"
        assert desc and "\n" not in desc and r.description.startswith(desc)
        assert builtin_recipe_path(name).read_text(encoding="utf-8").lstrip().startswith("#"), \
            f"{name}: the YAML should open with a comment stating its intent"
        # every built-in keeps stems and small heads dense
        # every kernel a built-in takes is 3 wide in each of its dims (3×3, 3×3×3, 3)
        assert r.select.kernel_sizes and all(set(k) == {3} for k in r.select.kernel_sizes), r.select.kernel_sizes
        assert (3, 3) in r.select.kernel_sizes or name == "all_3x3x3"
        assert r.select.in_channels.min == 16
        assert r.select.out_channels.min == 16 and r.replace == ReplaceSpec()


def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def test_schema_is_json_and_mirrors_the_loader() -> None:
    s = _schema()
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert s["type"] == "object" and s["additionalProperties"] is False
    defs = s["$defs"]
    assert set(s["properties"]) == set(TOP_KEYS)
    assert set(defs["select"]["properties"]) == set(SELECT_KEYS)
    assert set(defs["replaceKeys"]["properties"]) == set(REPLACE_KEYS)
    assert set(defs["override"]["properties"]) == set(OVERRIDE_KEYS)
    props = defs["replaceKeys"]["properties"]
    assert props["order"]["enum"] == list(ORDERS)
    assert props["init"]["enum"] == list(INITS)
    assert props["mid_norm"]["enum"] == [None, *MID_NORMS]
    assert props["mid_act"]["enum"] == [None, *MID_ACTS]
    assert s["properties"]["extends"]["enum"] == BUILTINS


@pytest.mark.parametrize("path", [*(str(builtin_recipe_path(n)) for n in BUILTINS), *map(str, EXAMPLES)])
def test_recipe_files_validate_against_the_schema(path: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    schema = _schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(yaml.safe_load(Path(path).read_text())))
    assert not errors, f"{path}: {[e.message for e in errors]}"


@pytest.mark.parametrize("bad", [
    {"replace": {"depth_multiplier": 2, "energy": 0.5}},
    {"replace": {"order": "dwpw"}},
    {"select": {"kernal_size": [3]}},
    {"overrides": [{"match": "a"}]},
    {"overrides": [{"match": "a", "skip": True, "replace": {"order": "auto"}}]},
])
def test_schema_rejects_what_the_loader_rejects(bad: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    assert list(jsonschema.Draft202012Validator(_schema()).iter_errors(bad))
    with pytest.raises(RecipeError):
        load_recipe(bad)


def test_example_recipes_load() -> None:
    assert len(EXAMPLES) >= 2
    for path in EXAMPLES:
        r = load_recipe(path)
        assert r.name == path.stem and r.source == str(path)
    energy = load_recipe(ROOT / "recipes" / "unet_decoder_energy.yaml")
    assert energy.replace.energy == 0.9 and energy.replace.depth_multiplier is None
    assert [o.skip for o in energy.overrides] == [False, True]


# --- bad recipes ----------------------------------------------------------------------------
BAD_YAML = [
    # (file text, message fragments)
    ("name: x\nselect:\n  kernel_size: [3x3\n",
     ["bad.yaml", "line 4", "not valid YAML"]),
    ("- just\n- a list\n", ["bad.yaml", "expected a mapping", "a list"]),
    ("", ["bad.yaml", "empty"]),
    ("name: x\nselect:\n  kernal_size: [3x3]\n",
     ["bad.yaml", "line 3", "select.kernal_size", "unknown key", "kernel_size", "did you mean 'kernel_size'"]),
    ("name: x\nselect:\n  kernel_size: [3x3, 5x]\n",
     ["bad.yaml", "select.kernel_size[1]", "'5x'", "'3x3'"]),
    ("name: x\nreplace:\n  order: dwpw\n",
     ["bad.yaml", "line 3", "replace.order", "'dwpw'", "'dw_pw', 'pw_dw', 'auto'", "did you mean 'dw_pw'"]),
    ("name: x\noverrides:\n  - match: a\n    replace: {order: pwdw}\n",
     ["bad.yaml", "overrides[0].replace.order", "'pwdw'", "did you mean 'pw_dw'"]),
    ("name: x\nreplace:\n  depth_multiplier: 0\n", ["bad.yaml", "replace.depth_multiplier", "0", "≥ 1"]),
    ("name: x\nreplace:\n  energy: 1.5\n", ["replace.energy", "1.5", "(0, 1]"]),
    ("name: x\nreplace:\n  energy: 0\n", ["replace.energy", "0", "(0, 1]"]),
    ("name: x\nreplace:\n  depth_multiplier: 2\n  energy: 0.9\n",
     ["bad.yaml", "replace", "both depth_multiplier (2) and energy (0.9)"]),
    ("name: x\nselect:\n  in_channels: {min: 64, max: 16}\n", ["select.in_channels", "min 64 > max 16"]),
    ("name: x\nselect:\n  in_channels: lots\n", ["select.in_channels", "'lots'", "{min: 16}"]),
    ("name: x\nselect:\n  in_channels: {minimum: 3}\n",
     ["select.in_channels.minimum", "unknown key", "min, max", "did you mean 'min'"]),
    ("name: x\nselect:\n  after_concat: yes please\n", ["select.after_concat", "'yes please'", "true, false or null"]),
    ("name: x\nselect:\n  groups: [1, many]\n", ["select.groups[1]", "'many'", "did you mean 'any'", "valid options"]),
    ("name: x\nselect:\n  groups: [0]\n", ["select.groups[0]", "0"]),
    ("name: x\nselect:\n  spatial_dims: [4]\n", ["select.spatial_dims[0]", "4", "valid options: 1, 2, 3"]),
    ("name: x\nselect:\n  transposed: anyy\n", ["select.transposed", "'anyy'", "did you mean 'any'"]),
    ("name: x\nselect:\n  kernel_size: [3x3x3x3]\n", ["select.kernel_size[0]", "'3x3x3'"]),
    ("name: x\nselect:\n  kernel_size: [1x1, 3x3]\n", ["select.kernel_size[0]", "already pointwise"]),
    ("name: x\nselect:\n  kernel_size: []\n", ["select.kernel_size", "empty list"]),
    ("name: x\nselect:\n  include: ['re:decoder.(blocks']\n",
     ["select.include[0]", "'re:decoder.(blocks'", "not a valid regex"]),
    ("name: x\nselect:\n  when_no_region_matches: {downstream_of_upsample: true}\n",
     ["select.when_no_region_matches", "without select.regions"]),
    ("name: x\nselect:\n  regions: [decoder]\n  when_no_region_matches: {downstream_of_upsmple: true}\n",
     ["select.when_no_region_matches.downstream_of_upsmple", "did you mean 'downstream_of_upsample'"]),
    ("name: x\nreplace:\n  mid_act: relu7\n",
     ["replace.mid_act", "'relu7'", "'relu6'", "null", "did you mean"]),
    ("name: x\nreplace:\n  mid_norm: none\n", ["replace.mid_norm", "'none'", "'batchnorm'", "write null"]),
    ("name: x\nreplace:\n  init: svdd\n", ["replace.init", "'svdd'", "'svd', 'random'", "did you mean 'svd'"]),
    ("name: x\noverrides:\n  - match: a\n", ["overrides[0]", "does nothing"]),
    ("name: x\noverrides:\n  - replace: {depth_multiplier: 2}\n", ["overrides[0]", "missing key 'match'"]),
    ("name: x\noverrides:\n  - match: a\n    skip: true\n    replace: {depth_multiplier: 2}\n",
     ["overrides[0]", "either skips or replaces"]),
    ("name: x\noverrides: {match: a}\n", ["overrides", "a list"]),
    ("name: x\nextends: decoder_onyl\n",
     ["bad.yaml", "extends", "'decoder_onyl'", "'all_3x3'", "did you mean 'decoder_only'"]),
    ("name: x\nname: y\n", ["bad.yaml", "line 2", "duplicate key 'name'"]),
    ("name: 3\n", ["name", "a non-empty string", "3"]),
    ("nmae: x\n", ["bad.yaml", "line 1", "'nmae'", "did you mean 'name'"]),
]


@pytest.mark.parametrize("text,fragments", BAD_YAML, ids=[f"bad{i}" for i in range(len(BAD_YAML))])
def test_bad_recipe_files_name_file_key_value_and_options(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    missing = [f for f in fragments if f not in msg]
    assert not missing, f"message {msg!r} lacks {missing}"
    assert msg.startswith(str(path)), msg


def test_bad_mapping_and_names() -> None:
    with pytest.raises(RecipeError, match=r"^<mapping>: replace\.order: 'x'"):
        load_recipe({"replace": {"order": "x"}})
    with pytest.raises(RecipeError) as info:
        load_recipe("decodr_only")
    msg = str(info.value)
    assert msg.startswith("builtin:decodr_only") and "did you mean 'decoder_only'" in msg
    assert all(n in msg for n in BUILTINS)
    with pytest.raises(RecipeError, match=r"missing\.yaml: recipe file not found.*decoder_only"):
        load_recipe("some/dir/missing.yaml")
    with pytest.raises(RecipeError, match="is a directory"):
        load_recipe(ROOT / "recipes")
    with pytest.raises(RecipeError, match="a built-in name, a .yaml path or a mapping"):
        load_recipe(42)  # type: ignore[arg-type]


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("description: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="latin1.yaml: not UTF-8"):
        load_recipe(path)


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/apply:subprocess.call"])
def test_python_tags_are_refused_and_never_run(tmp_path: Path, tag: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    arg = f'["touch {marker}"]' if tag.endswith("system") else f'[["touch", "{marker}"]]'
    path.write_text(f"name: {tag} {arg}\n", encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "evil.yaml" in str(info.value) and "not allowed" in str(info.value)
    assert tag.removeprefix("!!") in str(info.value)
    assert not marker.exists(), "the YAML tag was executed"


# --- records --------------------------------------------------------------------------------
def test_records_are_frozen() -> None:
    r = load_recipe(ROOT / "recipes" / "backbone_last_stage.yaml")
    e = load_recipe(ROOT / "recipes" / "unet_decoder_energy.yaml")
    (s,) = select(r, [fact()])
    cases = [(r, "name", "x"), (r.select, "regions", None), (r.replace, "order", "pw_dw"),
             (r.select.in_channels, "min", 0), (r.select.include[0], "text", "b"), (e.overrides[0], "skip", True),
             (e.overrides[0].replace, "values", ()), (r.select.graph, "after_concat", True), (s, "selected", False)]
    for obj, attr, value in cases:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, value)
    assert isinstance(r.select.kernel_sizes, tuple) and isinstance(e.overrides, tuple)


def test_load_accepts_recipe_pathlike_and_mapping_shorthands(tmp_path: Path) -> None:
    r = load_recipe("decoder_only")
    assert load_recipe(r) is r
    path = tmp_path / "mine.yaml"
    path.write_text("select:\n  kernel_size: [3, '5×5', [3, 1]]\n  stride: 1\n  regions: decoder\n", encoding="utf-8")
    m = load_recipe(path)
    assert m.name == "mine" and m.select.kernel_sizes == ((3, 3), (5, 5), (3, 1))
    assert m.select.strides == ((1, 1),) and m.select.regions == ("decoder",)
    assert m.replace == ReplaceSpec(order="dw_pw", depth_multiplier=1, energy=None)
    assert load_recipe({"select": {"in_channels": 8}}).select.in_channels == Range(8, 8)


def test_extends_merges_per_key() -> None:
    r = load_recipe({"extends": "decoder_only", "name": "mine",
                     "select": {"in_channels": {"min": 32}}, "replace": {"energy": 0.8}})
    base = load_recipe("decoder_only")
    assert r.name == "mine" and "decoder_only" in r.description
    assert r.select.regions == base.select.regions and r.select.in_channels.min == 32
    assert r.replace.energy == 0.8 and r.replace.depth_multiplier is None


def test_with_overrides_validates_and_keeps_per_name_overrides() -> None:
    r = load_recipe({"replace": {"energy": 0.9},
                     "overrides": [{"match": "decoder.blocks.0", "replace": {"depth_multiplier": 3}}]})
    assert r.with_overrides() is r
    r2 = r.with_overrides(depth_multiplier=2, order="auto", init="random")
    assert r2.replace == ReplaceSpec(order="auto", depth_multiplier=2, energy=None, init="random")
    assert r.replace.energy == 0.9, "with_overrides mutated the original"
    by_name = {s.fact.name: s.replace for s in select(r2, [fact("decoder.blocks.0.conv1"), fact("decoder.blocks.1.conv1")])}
    assert by_name["decoder.blocks.0.conv1"].depth_multiplier == 3
    assert by_name["decoder.blocks.1.conv1"].depth_multiplier == 2
    with pytest.raises(RecipeError, match=r"replace\.depth_multiplier: 0 is out of range"):
        r.with_overrides(depth_multiplier=0)
    with pytest.raises(RecipeError, match=r"replace\.order: 'sideways'.*'dw_pw'"):
        r.with_overrides(order="sideways")
    with pytest.raises(RecipeError, match="both depth_multiplier"):
        r.with_overrides(depth_multiplier=2, energy=0.5)


def test_name_patterns_match_ancestors_and_whole_names() -> None:
    assert NamePattern("decoder.blocks.0").matches("decoder.blocks.0.conv1.0")
    assert not NamePattern("decoder.blocks.0").matches("decoder.blocks.01.conv1")
    assert NamePattern("*.conv2*").matches("decoder.blocks.4.conv2.0")
    assert NamePattern(r"re:decoder\.blocks\.[2-4]").matches("decoder.blocks.3.conv1.0")
    assert not NamePattern(r"re:blocks\.[2-4]").matches("decoder.blocks.3.conv1.0"), "regex must match a whole name"


# --- selection ------------------------------------------------------------------------------
DENSE = {"select": {"kernel_size": ["3x3"], "in_channels": {"min": 16}, "out_channels": {"min": 16, "max": 256}}}

SKIPS = [
    # (recipe, fact, reason fragments)
    (DENSE, fact(conv_type="Conv3d", kernel_size=(3, 3, 3)), ["3×3×3 not in select.kernel_size [3×3]"]),
    (DENSE, fact(conv_type="Conv1d", kernel_size=(3,)), ["3 not in select.kernel_size [3×3]"]),
    (DENSE, fact(conv_type="ConvTranspose2d"), ["ConvTranspose2d", "transposed", "select.transposed"]),
    ({"select": {"transposed": True}}, fact(), ["Conv2d: not transposed", "select.transposed: true"]),
    ({"select": {"spatial_dims": [3]}}, fact(), ["Conv2d: 2-d not in select.spatial_dims [3]"]),
    ({"select": {"kernel_size": ["3x3x3"]}}, fact(conv_type="Conv3d", kernel_size=(5, 5, 5)),
     ["5×5×5 not in select.kernel_size [3×3×3]"]),
    ({"select": {"groups": [1, 2]}}, fact(groups=4), ["grouped (groups=4) not in select.groups [1, 2]"]),
    (DENSE, fact(plain=False, cls="timm.layers.conv2d_same.Conv2dSame"), ["Conv2dSame", "would change the output"]),
    (DENSE, fact(calls=0), ["never ran on the example input"]),
    (DENSE, fact(groups=64), ["depthwise (groups=64)", "already separable"]),
    (DENSE, fact(groups=4), ["grouped (groups=4)", "select.groups [1]", "groups: any"]),
    (DENSE, fact(k=1), ["1×1: already pointwise"]),
    (DENSE, fact(k=5), ["5×5 not in select.kernel_size [3×3]"]),
    (DENSE, fact(in_channels=3), ["in_channels 3 < 16", "select.in_channels.min"]),
    (DENSE, fact(out_channels=8), ["out_channels 8 < 16", "select.out_channels.min"]),
    (DENSE, fact(out_channels=512), ["out_channels 512 > 256", "select.out_channels.max"]),
    ({"select": {"stride": [1]}}, fact(stride=(2, 2)), ["stride 2×2 not in select.stride [1×1]"]),
    ({"select": {"dilation": [1]}}, fact(dilation=(12, 12)), ["dilation 12×12 not in select.dilation [1×1]"]),
    ({"select": {"regions": ["decoder", "head"]}}, fact("encoder.layer1.0.conv1"),
     ["region 'encoder' not in select.regions [decoder, head]"]),
    ({"select": {"include": ["decoder.blocks.1", "re:.*conv2"]}}, fact("decoder.blocks.0.conv1"),
     ["matches no select.include pattern", "decoder.blocks.1"]),
    ({"select": {"exclude": ["decoder.blocks.0.*"]}}, fact("decoder.blocks.0.conv1"),
     ["excluded by select.exclude 'decoder.blocks.0.*'"]),
    ({"select": {"output_stride": {"max": 4}}}, fact(output_stride=8.0), ["output stride 8 > 4", "output_stride.max"]),
    ({"select": {"output_stride": {"min": 8}}}, fact(output_stride=4.0), ["output stride 4 < 8", "output_stride.min"]),
    ({"select": {"output_stride": {"max": 4}}}, fact(output_stride=None), ["output stride unknown"]),
    ({"select": {"after_concat": True}}, fact(after_concat=False), ["not after a concat", "select.after_concat: true"]),
    ({"select": {"after_concat": False}}, fact(after_concat=True), ["after a concat", "select.after_concat: false"]),
    ({"select": {"after_upsample": True}}, fact(after_upsample=None),
     ["after_upsample unknown", "graph could not be captured", "select.after_upsample"]),
    ({"select": {"downstream_of_upsample": True}}, fact(downstream_of_upsample=False),
     ["not downstream of an upsample"]),
    ({"overrides": [{"match": "decoder.blocks.1.*", "replace": {"depth_multiplier": 2}},
                    {"match": ["x", "decoder.blocks.0.*"], "skip": True}]},
     fact("decoder.blocks.0.conv1"), ["skipped by overrides[1]", "'decoder.blocks.0.*'"]),
]


@pytest.mark.parametrize("recipe,f,fragments", SKIPS, ids=[f"skip{i}" for i in range(len(SKIPS))])
def test_each_filter_skips_with_a_readable_reason(recipe: dict[str, Any], f: ConvFact, fragments: list[str]) -> None:
    s = one(recipe, f)
    assert not s.selected and s.replace is None, s
    missing = [x for x in fragments if x not in s.reason]
    assert not missing, f"reason {s.reason!r} lacks {missing}"
    # filters a recipe sets: the same fact passes an empty recipe; intrinsic reasons hold for any recipe
    # (an empty recipe keeps the defaults: regular, dense convs)
    intrinsic = ("Transpose" in f.conv_type or not f.plain or f.calls == 0 or f.groups != 1
                 or all(v == 1 for v in f.kernel_size))
    assert one({}, f).selected is not intrinsic, one({}, f)


def test_checks_run_in_the_documented_order() -> None:
    # a 1×1 ConvTranspose3d that never ran in the encoder: transposed is reported first
    f = fact("encoder.x", conv_type="ConvTranspose3d", kernel_size=(1, 1, 1), calls=0)
    assert one("decoder_only", f).reason.startswith("ConvTranspose3d: transposed")
    assert one("decoder_only", dataclasses.replace(f, conv_type="Conv2d", kernel_size=(1, 1))).reason.startswith("never ran")
    g = fact("encoder.x", k=1, in_channels=3)
    assert one("decoder_only", g).reason == "1×1: already pointwise"
    h = fact("encoder.x", in_channels=3, stride=(2, 2))
    assert one({"select": {"in_channels": {"min": 16}, "stride": [1], "regions": ["decoder"]}}, h).reason.startswith(
        "in_channels 3")


def test_selected_reason_and_spec() -> None:
    r = {"select": {"regions": ["decoder"], "after_concat": True, "output_stride": {"max": 4},
                    "include": ["decoder.*"]},
         "replace": {"energy": 0.9, "order": "auto", "mid_act": "relu"}}
    s = one(r, fact(after_concat=True))
    assert s.selected
    assert s.reason == "3×3, region 'decoder', include 'decoder.*', output stride 4, after concat"
    assert s.replace == ReplaceSpec(order="auto", depth_multiplier=None, energy=0.9, mid_act="relu")


def test_overrides_first_match_wins_and_patch_the_spec() -> None:
    r = {"replace": {"energy": 0.9, "mid_act": "relu"},
         "overrides": [{"match": "re:decoder\\.blocks\\.0\\..*", "replace": {"depth_multiplier": 2, "mid_act": None}},
                       {"match": "decoder.*", "replace": {"order": "pw_dw"}},
                       {"match": "decoder.blocks.0.*", "skip": True}]}
    s0, s1, s2 = select(load_recipe(r), [fact("decoder.blocks.0.conv1"), fact("decoder.blocks.1.conv1"),
                                         fact("head.conv")])
    assert s0.selected and s0.replace == ReplaceSpec(depth_multiplier=2, energy=None, mid_act=None)
    assert "overrides[0]" in s0.reason and "m=2" in s0.reason
    assert s1.replace == ReplaceSpec(order="pw_dw", depth_multiplier=None, energy=0.9, mid_act="relu")
    assert s2.replace == ReplaceSpec(depth_multiplier=None, energy=0.9, mid_act="relu")
    assert "overrides" not in s2.reason


def test_select_keeps_order_and_identity() -> None:
    facts = smp_unet_resnet18_facts()
    sels = select(load_recipe("all_3x3"), facts)
    assert len(sels) == len(facts) and all(s.fact is f for s, f in zip(sels, facts))
    assert all(s.reason for s in sels)
    assert all((s.replace is not None) == s.selected for s in sels)


UNET_DECODER = [f"decoder.blocks.{b}.conv{c}.0" for b in range(5) for c in (1, 2)]


@pytest.mark.parametrize("recipe,expected", [
    ("decoder_only", UNET_DECODER),
    ("decoder_high_res", [n for n in UNET_DECODER if int(n.split(".")[2]) >= 2]),
    ("post_concat", [f"decoder.blocks.{b}.conv1.0" for b in range(4)]),
    ("post_upsample", [f"decoder.blocks.{b}.conv1.0" for b in range(5)]),
])
def test_builtins_on_smp_unet_resnet18_facts(recipe: str, expected: list[str]) -> None:
    assert chosen(recipe, smp_unet_resnet18_facts()) == expected


def test_all_3x3_on_smp_unet_keeps_stem_projections_and_head_dense() -> None:
    facts = smp_unet_resnet18_facts()
    sels = {s.fact.name: s for s in select(load_recipe("all_3x3"), facts)}
    assert sum(s.selected for s in sels.values()) == 26
    assert "7×7" in sels["encoder.conv1"].reason
    assert sels["encoder.layer2.0.downsample.0"].reason == "1×1: already pointwise"
    assert "out_channels 2 < 16" in sels["segmentation_head.0"].reason


def test_name_only_capture_region_recipes_still_work_graph_recipes_say_why() -> None:
    facts = smp_unet_resnet18_facts(graph=False)
    assert chosen("decoder_only", facts) == UNET_DECODER
    sels = select(load_recipe("post_concat"), facts)
    assert not any(s.selected for s in sels)
    assert "graph could not be captured" in next(s for s in sels if s.fact.name == UNET_DECODER[0]).reason


def _torchvision_deeplab_facts() -> list[ConvFact]:
    facts = [fact("backbone.conv1", k=7, in_channels=3, output_stride=2.0, downstream_of_upsample=False),
             fact("backbone.layer4.0.conv2", in_channels=512, out_channels=512, dilation=(2, 2), output_stride=8.0,
                  downstream_of_upsample=False),
             fact("classifier.0.convs.0.0", k=1, in_channels=2048, out_channels=256, downstream_of_upsample=False)]
    for i, rate in enumerate((12, 24, 36), start=1):
        facts.append(fact(f"classifier.0.convs.{i}.0", in_channels=2048, out_channels=256, dilation=(rate, rate),
                          output_stride=8.0, downstream_of_upsample=False))
    facts += [fact("classifier.0.project.0", k=1, in_channels=1280, out_channels=256, downstream_of_upsample=False),
              fact("classifier.1", in_channels=256, out_channels=256, output_stride=8.0, downstream_of_upsample=False),
              fact("classifier.4", k=1, in_channels=256, out_channels=21, downstream_of_upsample=False),
              fact("aux_classifier.0", in_channels=1024, out_channels=256, output_stride=8.0,
                   downstream_of_upsample=False)]
    return facts


def test_decoder_only_on_torchvision_heads() -> None:
    assert chosen("decoder_only", _torchvision_deeplab_facts()) == [
        "classifier.0.convs.1.0", "classifier.0.convs.2.0", "classifier.0.convs.3.0", "classifier.1",
        "aux_classifier.0"]
    fcn = [fact("backbone.layer4.0.conv2", in_channels=512, out_channels=512, downstream_of_upsample=False),
           fact("classifier.0", in_channels=2048, out_channels=512, output_stride=8.0, downstream_of_upsample=False),
           fact("classifier.4", k=1, in_channels=512, out_channels=21, downstream_of_upsample=False)]
    assert chosen("decoder_only", fcn) == ["classifier.0"]
    assert chosen(ROOT / "recipes" / "deeplab_aspp.yaml", _torchvision_deeplab_facts()) == [
        "classifier.0.convs.1.0", "classifier.0.convs.2.0", "classifier.0.convs.3.0"]


def test_region_fallback_is_a_model_level_decision() -> None:
    # names say nothing: a plain model with "features" and "up" blocks
    # (decoder_only falls back on after_bottleneck: what runs after the encoder's deepest point)
    plain = [fact("features.0", after_bottleneck=False), fact("features.3", after_bottleneck=False),
             fact("up.1", after_bottleneck=True)]
    sels = select(load_recipe("decoder_only"), plain)
    assert [s.selected for s in sels] == [False, False, True]
    assert "after bottleneck" in sels[2].reason and "fallback: no conv in select.regions" in sels[2].reason
    assert "not after the bottleneck" in sels[0].reason and "fallback" in sels[0].reason
    # one conv in a listed region switches the fallback off for the whole model
    with_head = [*plain, fact("head.0")]
    assert chosen("decoder_only", with_head) == ["head.0"]
    assert "region 'up' not in select.regions" in select(load_recipe("decoder_only"), with_head)[2].reason
    # name-only capture: the fallback cannot be checked, and says so
    unknown = [dataclasses.replace(f, after_bottleneck=None) for f in plain]
    reasons = [s.reason for s in select(load_recipe("decoder_only"), unknown)]
    assert all("graph could not be captured" in r and "when_no_region_matches" in r for r in reasons), reasons
    # without when_no_region_matches there is no fallback
    assert chosen({"select": {"regions": ["decoder"]}}, plain) == []


def test_region_globs() -> None:
    assert chosen({"select": {"regions": ["decode*"]}}, [fact("decode_head.conv"), fact("encoder.x")]) == [
        "decode_head.conv"]


def test_the_annotated_recipe_in_the_docs_loads() -> None:
    import yaml

    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    r = load_recipe(yaml.safe_load(block))
    assert r.name == "my_decoder" and r.replace.energy == 0.9 and len(r.overrides) == 2
