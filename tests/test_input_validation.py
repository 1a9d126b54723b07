"""Unit tests of the input validators (issue 13): bounded YAML, regex cost, numbers, plans, batches, files, sizes.

The CLI table (tests/test_bad_input_table.py) shows each end to end; these pin the validators'
behaviour and the properties the table cannot see: refusals are fast, nothing large is
allocated before a refusal, and what is valid still passes.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from torch import nn

import dsrewrite
from dsrewrite.errors import (DsRewriteError, InputShapeError, ModelLoadError, PlanError, PlanFileError, RecipeError,
                              UnsupportedModelError, UsageError)
from dsrewrite.io.arch_spec import parse_arch_args
from dsrewrite.planning.apply import apply_plan
from dsrewrite.planning.types import LayerConfig, Plan, PlanEntry
from dsrewrite.recipe import load_recipe
from dsrewrite.recipe.fields import MAX_VALUE, Ctx, int_value, number_value
from dsrewrite.recipe.regex_cost import UnsafeRegexError, check_regex
from dsrewrite.recipe.yaml_read import read_yaml
from dsrewrite.refit.batches import BatchError
from dsrewrite.runtime.input_files import MAX_TENSOR_BYTES, check_alloc, input_file, is_missing, path_exists
from dsrewrite.runtime.yaml_bounded import LIMITS, YamlLimitError, expanded_size, load_bounded


def _best_of(n: int, fn: Callable[[], object]) -> float:
    """The best of ``n`` wall times of ``fn()`` (exceptions count as returns): a timing robust to load."""
    best = math.inf
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001 - the refusal is what is timed
            pass
        best = min(best, time.perf_counter() - t0)
    return best


#: The yardstick: reading a flat 20,000-character list (about 6,700 nodes) that is within every limit.
_FLAT_TEXT = "x: [" + "1, " * 6_665 + "1]"


def _reference() -> float:
    return _best_of(1, lambda: load_bounded(_FLAT_TEXT))


def _bomb(levels: int, width: int = 9) -> str:
    lines = ["l0: &l0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- YAML


def test_alias_bomb_is_refused_fast_and_its_size_is_counted_in_linear_time() -> None:
    text = _bomb(30)  # 9^30 nodes expanded; 2 KB of text
    with pytest.raises(YamlLimitError, match="alias bomb"):
        load_bounded(text, max_aliases=10_000)  # the expansion bound, not the alias count, refuses it
    with pytest.raises(YamlLimitError, match="more than 100 aliases"):
        load_bounded(text)
    # refused faster than a 20 KB flat list is read (the issue saw 83 s, then out of memory)
    t_bomb, t_ref = _best_of(3, lambda: load_bounded(text, max_aliases=10_000)), _reference()
    assert t_bomb < 5 * t_ref, f"refusing the bomb took {t_bomb:.4f} s, reading 20 KB of flat YAML {t_ref:.4f} s"
    # the memoised count: exact for a small bomb, and fast for a huge one
    node = yaml.compose(_bomb(3, width=3), Loader=yaml.SafeLoader)
    # 4 keys + 4 sequences; l_i holds 3 copies of l_{i-1}: sizes 4, 13, 40, 121 (+1 for the root)
    assert expanded_size(node, 10**9) == 1 + 4 + 4 + 13 + 40 + 121
    # linear in the document, not in its expansion: twice the levels, about twice the time (not 2^30 times)
    n30, n60 = (yaml.compose(_bomb(k, width=2), Loader=yaml.SafeLoader) for k in (30, 60))
    assert expanded_size(n60, 10**30) > 2**60
    t30, t60 = _best_of(5, lambda: expanded_size(n30, 10**30)), _best_of(5, lambda: expanded_size(n60, 10**30))
    assert t60 < 10 * t30, f"60 levels took {t60:.2e} s, 30 levels {t30:.2e} s: the count is not memoised"


def test_a_few_aliases_within_the_limits_still_load() -> None:
    data, _ = load_bounded(_bomb(2, width=3))
    assert data["l2"] == [[["x"] * 3] * 3] * 3
    assert LIMITS["max_nodes"] >= 10_000 and LIMITS["max_depth"] >= 16


@pytest.mark.parametrize("text, match", [
    ("a: &a [*a]\n", "self-referencing"),
    ("a: &a {b: *a}\n", "self-referencing"),
    ("[" * 50_000 + "]" * 50_000, "deeper than 32"),
    ("{a: " * 50_000 + "1" + "}" * 50_000, "deeper than 32"),
    ("x: " + "9" * 5000 + "\n", "4300 digits"),
    ("# pad\n" * 200_000, "too large"),
])
def test_bounded_loader_refuses_with_a_limit_error_not_a_recursion_error(text: str, match: str) -> None:
    with pytest.raises(YamlLimitError, match=match):
        load_bounded(text)
    t_refuse, t_ref = _best_of(3, lambda: load_bounded(text)), _reference()
    assert t_refuse < 5 * t_ref, f"refusing took {t_refuse:.4f} s, reading 20 KB of flat YAML {t_ref:.4f} s"


def test_recipe_reader_uses_the_bounds_and_names_the_file() -> None:
    with pytest.raises(RecipeError, match=r"^r\.yaml: refused: .*alias bomb"):
        read_yaml("name: x\n" + _bomb(9), "r.yaml")
    with pytest.raises(RecipeError, match=r"^r\.yaml: refused: line 2: nested deeper"):
        read_yaml("name: x\nselect: " + "[" * 100 + "]" * 100, "r.yaml")


def test_key_lines_through_an_alias_are_walked_once() -> None:
    text = "base: &b\n  order: dw_pw\n  init: svd\nother: *b\n"
    data, lines = read_yaml(text, "r.yaml")
    assert data["other"] == data["base"]
    assert lines[("base", "order")] == 2 and lines[("base", "init")] == 3
    assert ("other", "order") not in lines  # reached through the alias: not walked again (its line is under base)
    assert lines[("other",)] == 4


@pytest.mark.parametrize("arg, match", [
    ("x=[&a [*a]]", "self-referencing"),
    ("x=" + "[" * 100 + "]" * 100, "deeper than"),
    ("x=" + "1" * 20_000, "characters long"),
    ("x=" + "9" * 5000, "4300 digits"),
])
def test_arch_args_use_the_bounds(arg: str, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        parse_arch_args([arg])
    assert parse_arch_args(["x=[1, [2, 3]]"]) == {"x": [1, [2, 3]]}


# ----------------------------------------------------------------------------- regex cost


@pytest.mark.parametrize("pattern", [
    r"(.*.*.*)*X", r"(a+)+$", r"(a*)*b", r"(\w+\s?)*$", r"((\d+)*\.)*x", r"(x+x+)+y", r"(ab|a)*c", r"(.|x)+y",
    r"(?:a|a)+b", r"a{1001}", r"a{5,2000}", "a" * 1001,
])
def test_costly_regexes_are_refused_at_load(pattern: str) -> None:
    with pytest.raises(UnsafeRegexError, match="regex"):
        check_regex(pattern)


@pytest.mark.parametrize("pattern", [
    r"decoder\.blocks\.[2-4]\..*", r"(encoder|decoder)\..*", r"(?:layer\d\.)*conv", r".*conv[12]", r"(foo|bar)+",
    r"decoder\.(0|1|2)\.conv\d+", r"(?>a+)+b", r"a{3}\.b{1,1000}", r"[a-z_]+\.\d+",
])
def test_ordinary_regexes_pass(pattern: str) -> None:
    check_regex(pattern)


def test_recipe_with_a_costly_regex_names_the_key_and_the_pattern() -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe({"name": "x", "select": {"include": ["decoder.*", "re:(.*.*.*)*X"]}})
    msg = str(info.value)
    assert "select.include[1]" in msg and "'(.*.*.*)*X'" in msg and "exponential" in msg


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("value, match", [
    (float("nan"), "not a finite number"), (float("inf"), "not a finite number"), (-1.0, "out of range"),
    (1e300, "≤ 2147483647"), (True, "expected a number"),
])
def test_number_value_is_finite_and_in_range(value: float, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        number_value(Ctx("r.yaml"), ("select", "output_stride"), value)
    assert number_value(Ctx("r.yaml"), ("x",), 16.0) == 16.0


def test_int_value_has_an_upper_bound() -> None:
    ctx = Ctx("r.yaml")
    with pytest.raises(RecipeError, match=r"100000000000… \(31 digits\) is out of range: must be ≥ 1 and ≤ 10\.$"):
        int_value(ctx, ("k",), 10**30, minimum=1, maximum=10)
    assert int_value(ctx, ("k",), MAX_VALUE, minimum=0) == MAX_VALUE
    with pytest.raises(RecipeError):
        int_value(ctx, ("k",), MAX_VALUE + 1, minimum=0)


def test_recipe_numbers_are_bounded() -> None:
    for data, where in [({"replace": {"depth_multiplier": 10**20}}, "replace.depth_multiplier"),
                        ({"latency": {"min_speedup": math.inf}}, "latency.min_speedup"),
                        ({"latency": {"min_speedup": math.nan}}, "latency.min_speedup"),
                        ({"latency": {"rounds": 10**30}}, "latency.rounds"),
                        ({"select": {"output_stride": math.nan}}, "select.output_stride")]:
        with pytest.raises(RecipeError, match=re.escape(where)):
            load_recipe({"name": "x", **data})


def test_cli_depth_multiplier_bound_is_the_recipe_bound() -> None:
    from dsrewrite.cli.common import MAX_DEPTH_MULTIPLIER as cli_max
    from dsrewrite.recipe.replace_keys import MAX_DEPTH_MULTIPLIER

    assert cli_max == MAX_DEPTH_MULTIPLIER


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1)).eval()


def test_depth_multiplier_above_kernel_taps_is_refused_at_plan_time() -> None:
    with pytest.raises(RecipeError, match=r"conv '2' \(3×3\): depth multiplier 10 is more than kh·kw = 9"):
        dsrewrite.rewrite(_net(), "all_3x3", input_shape=(1, 3, 8, 8), depth_multiplier=10)
    light = dsrewrite.rewrite(_net(), "all_3x3", input_shape=(1, 3, 8, 8), depth_multiplier=9)  # the edge passes
    assert type(light[2]).__name__ == "DepthwiseSeparableConv2d"


# ----------------------------------------------------------------------------- plans


@pytest.mark.parametrize("text", ["[]", "null", '"plan"', "3", "[" * 10_000 + "]" * 10_000, b"{\"a\": \"caf\xe9\"}",
                                  "{", '{"entries": {}, "recipe": "r", "capture": "fx"}',
                                  '{"entries": [{"name": "a", "action": "replace", "reason": "", '
                                  '"config": {"depth_multiplier": NaN}}], "recipe": "r", "capture": "fx"}'])
def test_plan_from_json_raises_only_plan_file_errors(text: str | bytes) -> None:
    with pytest.raises(PlanFileError) as info:
        Plan.from_json(text, source="p.json")
    assert isinstance(info.value, UsageError) and isinstance(info.value, PlanError)
    assert str(info.value).startswith("p.json: ") and "\n" not in str(info.value)


def test_tampered_depth_multiplier_is_refused_before_anything_is_allocated() -> None:
    model = nn.Sequential(nn.Conv2d(256, 256, 3))
    plan = Plan((PlanEntry("0", "replace", "t", LayerConfig(depth_multiplier=100_000)),), "r", "fx")
    # what the block would have needed: 256·100000 depthwise 3×3 kernels + the pointwise 256×25.6M (float32)
    would_need = (256 * 100_000 * 9 + 256 * 256 * 100_000) * 4
    tracemalloc.start()
    try:
        with pytest.raises(PlanFileError, match="depth multiplier 100000 is more than kh·kw = 9"):
            apply_plan(model, plan, init="random")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak {peak} bytes before the refusal (the block would need {would_need:,})"
    # torch's allocator is not seen by tracemalloc: check the refusal comes before any block is built too
    built: list[int] = []
    orig = torch.empty
    try:
        torch.empty = lambda *a, **k: built.append(1) or orig(*a, **k)  # type: ignore[assignment]
        with pytest.raises(PlanFileError):
            apply_plan(model, plan, init="random")
    finally:
        torch.empty = orig  # type: ignore[assignment]
    assert built == [], "a tensor was built before the plan was refused"


def test_load_rewrite_with_a_tampered_plan_file_raises_a_typed_error(tmp_path: Path) -> None:
    from dsrewrite.io import load_rewrite, save_rewrite
    from dsrewrite.planner import plan as make_plan

    net = _net()
    p = make_plan(net, "all_3x3", torch.zeros(1, 3, 8, 8))
    w, pf = save_rewrite(apply_plan(net, p), p, tmp_path / "o.pt")
    data = json.loads(pf.read_text())
    for e in data["entries"]:
        if e["action"] == "replace":
            e["config"]["depth_multiplier"] = 100_000
    pf.write_text(json.dumps(data))
    with pytest.raises(PlanFileError, match="kh·kw"):
        load_rewrite(_net(), pf, w)
    pf.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(PlanFileError, match="not UTF-8"):
        load_rewrite(_net(), pf, w)


# ----------------------------------------------------------------------------- weights and batches


def test_non_finite_weights_are_refused_naming_the_conv_but_random_init_needs_no_values() -> None:
    net = _net()
    with torch.no_grad():
        net[2].weight[0, 0, 0, 0] = float("inf")
    plan = Plan((PlanEntry("2", "replace", "t", LayerConfig()),), "r", "fx")
    with pytest.raises(UnsupportedModelError, match=r"conv '2': its weight holds inf \(1 of 2304 values\)"):
        apply_plan(net, plan)
    assert type(apply_plan(net, plan, init="random")[2]).__name__ == "DepthwiseSeparableConv2d"


@pytest.mark.parametrize("batches, match", [
    ([torch.randn(2, 3, 8, 8), torch.full((2, 3, 8, 8), float("nan"))], r"calibration batch 1 holds NaN \(384 of 384 values\)"),
    ([torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8)], r"calibration batch 1 has shape \(2, 5, 8, 8\).*3 channels"),
    ([torch.randn(0, 3, 8, 8)], "calibration batch 0 is empty"),
    ([torch.randn(2, 3, 8, 8, dtype=torch.complex64)], "complex"),
])
def test_bad_calibration_batches_raise_batch_errors_from_the_api(batches: list[torch.Tensor], match: str) -> None:
    net = _net()
    x = torch.randn(1, 3, 8, 8)
    p = dsrewrite.plan(net, "all_3x3", x)
    with pytest.raises(BatchError, match=match) as info:
        dsrewrite.rewrite_with_plan(net, p, x, calibration=batches)
    assert isinstance(info.value, DsRewriteError) and isinstance(info.value, UsageError)


# ----------------------------------------------------------------------------- files and sizes


def test_input_file_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = tmp_path / "f.pt"
    os.mkfifo(fifo)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"x" * 2000)
    ok = tmp_path / "ok.pt"
    ok.write_bytes(b"data")
    cases = [(fifo, {}, "not a regular file (a FIFO)"), ("/dev/null", {}, "not a regular file (a device)"),
             (tmp_path / ("n" * 300), {}, "too long"), (str(tmp_path / "a\0b"), {}, "null byte"),
             (tmp_path / "missing", {}, "does not exist"), (tmp_path, {}, "is a directory"),
             (big, {"max_bytes": 1000}, "too large")]
    for path, kw, match in cases:
        with pytest.raises(RecipeError, match=re.escape(match)):
            input_file(path, "recipe", RecipeError, **kw)
    assert input_file(tmp_path, "data", folder_ok=True) == tmp_path
    assert input_file(ok, "model file") == ok
    # permissions: root reads anything, so the refusal of open() is simulated
    real_open = open

    def denied(p: object, *a: object, **k: object) -> object:
        if str(p) == str(ok):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
        return real_open(p, *a, **k)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(ModelLoadError, match="cannot be read: Permission denied"):
        input_file(ok, "model file", ModelLoadError)
    monkeypatch.undo()
    assert (path_exists(tmp_path / ("n" * 300)), is_missing(tmp_path / ("n" * 300)), is_missing(tmp_path / "m")) \
        == (False, False, True)


def test_shapes_too_large_to_allocate_are_refused_before_allocating() -> None:
    check_alloc((1, 1, 1024, 1024, 1024), 4, "volume")  # exactly 4 GiB: allowed
    with pytest.raises(UsageError, match="too large"):
        check_alloc((1, 1, 1024, 1024, 1025), 4, "volume")
    tracemalloc.start()
    try:
        with pytest.raises(InputShapeError, match=r"input shape \(1, 3, 100000, 100000\) is too large: 120.0 GB"):
            dsrewrite.rewrite(_net(), "all_3x3", input_shape=(1, 3, 100_000, 100_000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MAX_TENSOR_BYTES // 1000


@pytest.mark.parametrize("kwargs", [{"lr": math.inf}, {"lr": math.nan}, {"lr": 0.0}, {"layer_weight": math.inf}])
def test_heal_numbers_are_finite(kwargs: dict[str, float]) -> None:
    from dsrewrite.heal import heal

    net = _net()
    light = apply_plan(net, dsrewrite.plan(net, "all_3x3", torch.zeros(1, 3, 8, 8)))
    with pytest.raises(UsageError, match="finite lr > 0"):
        heal(light, net, [torch.randn(2, 3, 8, 8)], steps=1, progress=False, **kwargs)


@pytest.mark.parametrize("ridge", [math.nan, math.inf, -1.0])
def test_calibration_ridge_is_finite(ridge: float) -> None:
    net = _net()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(UsageError, match="ridge >= 0"):
        dsrewrite.rewrite_with_plan(net, dsrewrite.plan(net, "all_3x3", x), x, calibration=[torch.randn(2, 3, 8, 8)],
                                    calibration_options={"ridge": ridge})
