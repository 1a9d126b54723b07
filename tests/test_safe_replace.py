"""Safe replacement: parameter reads, hooks, lazy convs, parametrizations and hook-based norms (issue 14).

Each case checks the plan's reason, or the carried hook's / the folded norm's effect numerically
at full rank (m = 9 for 3×3: the block represents the dense kernel exactly).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import dsrewrite
from dsrewrite.errors import OutputError, PlanError, UnsupportedModelError
from dsrewrite.io import load_rewrite, save_rewrite
from dsrewrite.planner import plan
from dsrewrite.planning.apply import apply_plan
from dsrewrite.planning.safety import check_safety
from dsrewrite.planning.types import LayerConfig, PlanEntry
from safe_nets import KernelReuse, Three, WithLazy
from cli_checks import assert_clean_cli_error, run_cli

FULL = 9  # full rank for 3×3


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def _entry(p, name):
    return next(e for e in p.entries if e.name == name)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _rewrite(model: nn.Module, recipe="all_3x3", m: int = FULL, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dsrewrite.rewrite_and_report(model, recipe, example_inputs=_x(), depth_multiplier=m, **kw)


# --------------------------------------------------------------------------- parameters read elsewhere


def test_kernel_reuse_and_dtype_read_keep_the_conv_dense() -> None:
    model = KernelReuse().eval()
    p = plan(model, "all_3x3", _x())
    b, c, d = _entry(p, "b"), _entry(p, "c"), _entry(p, "d")
    assert b.action == "skip" and "read outside its own forward (torch.conv2d while KernelReuse '(root)'" in b.reason
    assert c.action == "skip" and "a read of .dtype" in c.reason, c.reason
    assert d.action == "replace", d.reason
    res = _rewrite(model)
    assert isinstance(res.model.b, nn.Conv2d) and isinstance(res.model.c, nn.Conv2d)
    with torch.no_grad():
        err = _max_err(res.model(_x(2)), model(_x(2)))  # runs (no AttributeError) and is exact at full rank
    assert err < 1e-4, f"max error {err:.3e}"


def test_without_the_probe_the_plan_says_reads_were_not_looked_for() -> None:
    from dsrewrite.planning.capture import capture
    from dsrewrite.planning.planner import plan_from_capture
    from dsrewrite.recipe import load_recipe

    model = KernelReuse().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = plan_from_capture(model, load_recipe("all_3x3"), capture(model, _x()))
    assert _entry(p, "b").action == "replace"  # nothing saw the read ...
    assert any("were not looked for" in n for n in p.notes), p.notes  # ... and the plan says so


def test_a_hook_that_reads_the_weight_keeps_the_conv_dense() -> None:
    model = Three().eval()
    model.b.register_forward_pre_hook(lambda mod, args: (args[0].to(mod.weight.dtype),))
    reason = _entry(plan(model, "all_3x3", _x()), "b").reason
    assert "kept dense: its parameters are read outside its own forward (a read of .dtype" in reason, reason


# --------------------------------------------------------------------------- hooks carried


def test_input_changing_pre_hook_is_carried_and_exact_at_full_rank() -> None:
    model = Three().eval()
    model.b.register_forward_pre_hook(lambda mod, args: (args[0] * 2.0 + 0.5,))
    res = _rewrite(model)
    assert "hooks carried: 1" in _entry(res.plan, "b").reason
    x = _x(3)
    with torch.no_grad():
        ref, out = model(x), res.model(x)
        err = _max_err(out, ref)
        assert err < 1e-4, f"carried pre-hook: max error {err:.3e} at full rank"
        res.model.b._forward_pre_hooks.clear()  # the same block without the hook is far off: the hook mattered
        dropped = _max_err(res.model(x), ref)
    assert dropped > 1e-2, f"without the hook the error is only {dropped:.3e}: the test could not fail"


def test_feature_hook_and_kwargs_and_always_call_hooks_are_carried() -> None:
    model = Three().eval()
    feats: list[torch.Tensor] = []
    model.c.register_forward_hook(lambda mod, args, out: feats.append(out.detach()))
    model.b.register_forward_pre_hook(lambda mod, args, kwargs: ((args[0] + 1.0,), kwargs), with_kwargs=True)
    model.b.register_forward_hook(lambda mod, args, kwargs, out: out * 0.5, with_kwargs=True, always_call=True)
    res = _rewrite(model)
    assert "hooks carried: 2" in _entry(res.plan, "b").reason and "hooks carried: 1" in _entry(res.plan, "c").reason
    new_b = res.model.b
    assert len(new_b._forward_pre_hooks_with_kwargs) == 1 and len(new_b._forward_hooks_always_called) == 1
    x = _x(4)
    with torch.no_grad():
        feats.clear()
        ref = model(x)
        ref_feat = feats.pop()
        out = res.model(x)
    assert len(feats) == 1, "the feature hook did not fire on the block"
    assert torch.equal(feats[0], out), "the feature hook did not receive the block's output"
    err, ferr = _max_err(out, ref), _max_err(feats[0], ref_feat)
    assert err < 1e-4 and ferr < 1e-4, f"max error {err:.3e}, feature {ferr:.3e}"
    assert type(model.b).__name__ == "Conv2d" and len(model.b._forward_hooks) == 1  # the caller's model untouched


@pytest.mark.parametrize("kind", ["backward", "state_dict"])
def test_uncarriable_hooks_keep_the_conv_dense(kind: str) -> None:
    model = Three().eval()
    if kind == "backward":
        model.b.register_full_backward_hook(lambda mod, gi, go: None)
        want = "full backward hook"
    else:
        model.b._register_state_dict_hook(lambda mod, sd, prefix, local: sd)
        want = "state-dict hook"
    p = plan(model, "all_3x3", _x())
    e = _entry(p, "b")
    assert e.action == "skip" and want in e.reason, e.reason
    assert _entry(p, "c").action == "replace"
    forced = type(p)(entries=(type(e)("b", "replace", "forced", _entry(p, "c").config),), recipe="x", capture="fx")
    with pytest.raises(PlanError, match=want):
        apply_plan(model, forced)  # a plan from elsewhere cannot force it either


# --------------------------------------------------------------------------- lazy convs


def test_lazy_conv_the_forward_reaches_is_refused_and_not_materialised() -> None:
    model = WithLazy(reach=True)
    with pytest.raises(UnsupportedModelError, match="'lazy' .LazyConv2d. is lazy"):
        plan(model, "all_3x3", _x())
    assert type(model.lazy).__name__ == "LazyConv2d"
    assert isinstance(model.lazy.weight, nn.parameter.UninitializedParameter)


def test_lazy_conv_not_reached_is_skipped_with_reason_and_rewrite_refuses() -> None:
    model = WithLazy(reach=False)
    reason = check_safety(model, _x()).refusal("lazy")
    assert reason is not None and "it is lazy (LazyConv2d)" in reason and "does not materialise" in reason
    with pytest.raises(UnsupportedModelError, match="lazy module.*'lazy'.*does not materialise"):
        _rewrite(model)
    forced = type(plan(model, "all_3x3", _x()))  # a plan from elsewhere that names the lazy conv
    p = forced(entries=(PlanEntry("lazy", "replace", "forced", LayerConfig()),), recipe="x", capture="fx")
    with pytest.raises(PlanError, match="is lazy .LazyConv2d. and its parameters are not initialised"):
        apply_plan(model, p, init="random")
    assert isinstance(model.lazy.weight, nn.parameter.UninitializedParameter)


# --------------------------------------------------------------------------- parametrizations


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("norm", ["spectral", "old_spectral"])
def test_spectral_norm_read_without_side_effects(norm: str, mode: str) -> None:
    model = Three(norm, on=("b", "c")).train(mode == "train")
    before = _buffers(model)
    res = _rewrite(model)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"the caller's tensors changed: {changed}"
    assert model.training == (mode == "train") and res.model.training == (mode == "train")
    reason = _entry(res.plan, "b").reason
    assert "folded into the block" in reason, reason
    if norm == "spectral":
        assert "parametrize.cached()" in reason
    fid = res.report.fidelity["example"]
    assert fid.rel_l2 is not None and fid.rel_l2 < 1e-5, f"full rank rel L2 {fid.rel_l2!r}"
    if norm == "spectral" and mode == "train":  # what a plain read would do: the power iteration writes _u
        with torch.no_grad():
            _ = model.b.weight
        assert not torch.equal(before["b.parametrizations.weight.0._u"], model.state_dict()["b.parametrizations.weight.0._u"])


@pytest.mark.parametrize("on", [("b",), ("c",)])
def test_old_weight_norm_rewrite_saves_and_reloads(tmp_path: Path, on: tuple[str, ...]) -> None:
    model = Three("old_weight", on=on).eval()
    res = dsrewrite.rewrite_and_report(model, {"name": "b_only", "select": {"include": ["b"]}},
                                       example_inputs=_x(), depth_multiplier=FULL)
    assert _entry(res.plan, "b").action == "replace", _entry(res.plan, "b").reason
    w, p = save_rewrite(res.model, res.plan, tmp_path / "o.pt")
    fresh = Three("old_weight", on=on, seed=5)  # never run: its weight_norm attribute is not a graph leaf
    again = load_rewrite(fresh, p, w)
    x = _x(6)
    with torch.no_grad():
        err = _max_err(again(x), res.model(x))
        ref_err = _max_err(res.model(x), model(x))
    assert err < 1e-6 and ref_err < 1e-4, f"reload {err:.3e}, vs original {ref_err:.3e}"


def test_parametrized_module_left_is_caught_before_writing(tmp_path: Path) -> None:
    model = Three("spectral", on=("c",)).eval()
    res = dsrewrite.rewrite_and_report(model, {"name": "b_only", "select": {"include": ["b"]}},
                                       example_inputs=_x(), depth_multiplier=FULL)
    with pytest.raises(OutputError, match=r"parametrized module \('c', Conv2d;.*--save-format safetensors"):
        save_rewrite(res.model, res.plan, tmp_path / "o.pt")
    assert list(tmp_path.iterdir()) == []
    pytest.importorskip("safetensors.torch")
    w, p = save_rewrite(res.model, res.plan, tmp_path / "o.safetensors", save_format="safetensors")
    again = load_rewrite(Three("spectral", on=("c",), seed=3), p, w)
    x = _x(7)
    with torch.no_grad():
        err = _max_err(again.eval()(x), res.model(x))
    assert err < 1e-6, f"reload max error {err:.3e}"


def test_cli_apply_refuses_before_the_work(tmp_path: Path) -> None:
    sd = tmp_path / "sd.pt"
    torch.save(Three("spectral", on=("c",)).state_dict(), sd)
    out = tmp_path / "o.pt"
    r = run_cli(["apply", sd, "--arch", "safe_nets:spectral_on_c", "--recipe", "all_3x3", "--input-shape",
                 "1,3,12,12", "-o", out])
    # all_3x3 replaces b and c (c's parametrization is folded), so this one saves:
    assert r.exit_code == 0, r.output
    recipe = tmp_path / "b.yaml"
    recipe.write_text("name: b_only\nselect:\n  include: [b]\n", encoding="utf-8")
    out2 = tmp_path / "o2.pt"
    r = run_cli(["apply", sd, "--arch", "safe_nets:spectral_on_c", "--recipe", recipe, "--input-shape",
                 "1,3,12,12", "-o", out2])
    assert_clean_cli_error("parametrized leftover", r, ["parametrized module", "'c'", "--save-format safetensors"])
    assert "rewriting" not in r.stderr, "the check came after the work"
    assert not out2.exists() and not (tmp_path / "o2.plan.json").exists()


class _BiasCache(nn.Module):
    """Like timm's LeViT/EfficientFormer attention: an eval forward caches a tensor computed from a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bias = nn.Parameter(torch.randn(16, 1, 1))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            if "b" not in self.cache:
                self.cache["b"] = self.bias * 2  # non-leaf when the forward runs with gradients
            return self.conv(x) + self.cache["b"]
        return self.conv(x) + self.bias * 2


def test_a_model_caching_a_computed_tensor_in_a_dict_is_rewritten() -> None:
    torch.manual_seed(0)
    model = _BiasCache().eval()
    x = torch.randn(1, 16, 8, 8)
    model(x)  # the cache holds a non-leaf tensor now (grad enabled), as after capture's eager run
    assert not model.cache["b"].is_leaf
    res = dsrewrite.rewrite_and_report(model, {"name": "all", "select": {"in_channels": {"min": 1}}},
                                       example_inputs=x, depth_multiplier=9)
    assert res.plan.entries[0].action == "replace", res.plan.entries[0].reason
    with torch.no_grad():
        err = float((res.model(x) - model(x)).abs().max())
    assert err < 1e-4, f"max error {err:.3g}"


def test_the_callers_model_still_deepcopies_after_planning() -> None:
    """Capture's eager run (with gradients, for final predictors) must not leave a graph-attached cache behind."""
    import copy

    torch.manual_seed(0)
    model = _BiasCache().eval()
    x = torch.randn(1, 16, 8, 8)
    dsrewrite.plan(model, {"name": "all", "select": {"in_channels": {"min": 1}}}, x)
    assert "b" in model.cache and model.cache["b"].is_leaf
    copy.deepcopy(model)  # raised "Only Tensors created explicitly by the user ..." before the fix



class _SpectralConv3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.utils.parametrizations.spectral_norm(nn.Conv3d(16, 16, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x)


class _ReusedConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x) + torch.nn.functional.conv1d(x, self.c.weight, padding=2, dilation=2)


_ND = {"name": "nd", "select": {"in_channels": {"min": 1}, "kernel_size": ["3x3x3", [3]]}}


def test_a_parametrized_conv3d_is_read_as_a_conv3d_and_exact_at_full_rank() -> None:
    torch.manual_seed(0)
    model, x = _SpectralConv3d().eval(), torch.randn(1, 16, 6, 6, 6)
    res = dsrewrite.rewrite_and_report(model, _ND, example_inputs=x, depth_multiplier=27)
    assert _entry(res.plan, "c").action == "replace", _entry(res.plan, "c").reason
    with torch.no_grad():
        err = float((res.model(x) - model(x)).abs().max())
    assert err < 1e-4, f"max error {err:.3g}"


def test_kernel_reuse_of_a_conv1d_keeps_it_dense() -> None:
    torch.manual_seed(0)
    model, x = _ReusedConv1d().eval(), torch.randn(1, 16, 20)
    with pytest.warns(UserWarning):  # nothing selected
        p = dsrewrite.plan(model, _ND, x)
    e = _entry(p, "c")
    assert e.action == "skip" and "read outside its own forward" in e.reason and "conv1d" in e.reason, e.reason
