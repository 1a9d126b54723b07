"""Loading a state dict into an arch on the meta device (``dsrewrite.io.meta_load``).

Each model here is compared with what the copying path gives (build the architecture, then
``load_state_dict``): same class, values, dtypes, ``requires_grad``, non-persistent buffers.
Models whose meta build cannot give that (computed non-persistent buffers, tied weights,
``weight_norm``'s plain attribute, an import while building) must fall back; the others must
really use the file's tensors (no copy). User factories live in a module written to ``tmp_path``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

from dsrewrite.errors import ModelLoadError
from dsrewrite.io.arch import arch_spec, build_arch
from dsrewrite.io.load import load_model
from dsrewrite.io.meta_load import fit_on_meta, meta_leftovers
from dsrewrite.io.state_dict import fit_state_dict

MODS = "dsr_meta_load_factories"
LAZY_DEP = "dsr_meta_load_lazy_dep"

_SOURCE = f'''
import torch
from torch import nn


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)
        self.head.bias.requires_grad_(False)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


class NonPersistent(Plain):
    def __init__(self):
        super().__init__()
        self.register_buffer("index", torch.arange(6).view(2, 3) * 2 + 1, persistent=False)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4, bias=False)
        self.dec = nn.Linear(4, 4, bias=False)
        self.dec.weight = self.enc.weight


class Double(Plain):
    def __init__(self):
        super().__init__()
        self.double()


class WeightNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.utils.weight_norm(nn.Linear(3, 5))


class Untied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)


def lazy():
    import {LAZY_DEP}
    return Plain()


def lazy_tolerant():  # builds something else when the import fails
    model = Plain()
    try:
        import {LAZY_DEP}
    except ImportError:
        model.head.bias.requires_grad_(True)
    return model
'''


@pytest.fixture
def mods(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "factories"
    d.mkdir()
    (d / f"{MODS}.py").write_text(_SOURCE)
    (d / f"{LAZY_DEP}.py").write_text("import torch\nCONST = torch.ones(3)\n")
    monkeypatch.syspath_prepend(str(d))
    yield d
    for name in (MODS, LAZY_DEP):
        sys.modules.pop(name, None)


def _state(seed: int, spec: str) -> dict[str, torch.Tensor]:
    """A state dict of random values for ``spec`` (its own tensors, not a built model's)."""
    torch.manual_seed(seed)
    model = build_arch(spec)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        out[k] = (torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype) if v.is_floating_point()
                  else v.clone() + 3)
        if k.endswith("running_var"):
            out[k] = out[k].abs() + 0.5
    return out


def _copy_path(spec: str, sd: dict[str, torch.Tensor]) -> nn.Module:
    model = build_arch(spec)
    fit_state_dict(model, sd, source="ck.pt", arch=spec)
    return model


def assert_same_model(got: nn.Module, want: nn.Module) -> None:
    assert type(got) is type(want) and got.training == want.training
    gp, wp = dict(got.named_parameters()), dict(want.named_parameters())
    gb, wb = dict(got.named_buffers()), dict(want.named_buffers())  # non-persistent ones too
    assert list(gp) == list(wp) and list(gb) == list(wb)
    for name in [*wp, *wb]:
        g, w = (gp | gb)[name], (wp | wb)[name]
        assert (g.dtype, g.device, g.shape, g.requires_grad) == (w.dtype, w.device, w.shape, w.requires_grad), name
        assert torch.equal(g, w), f"{name}: max abs diff {(g.double() - w.double()).abs().max().item()}"
    assert not meta_leftovers(got)


def test_meta_path_uses_the_files_tensors(mods: Path) -> None:
    spec = f"{MODS}:Plain"
    sd = _state(0, spec)
    result = fit_on_meta(arch_spec(spec), sd, source="ck.pt")
    assert result is not None, "a plain conv/bn/linear model must take the meta path"
    model, note = result
    assert note == ""
    own = model.state_dict()
    for k, v in sd.items():  # structural: no copy, the parameters are the loaded storages
        assert own[k].data_ptr() == v.data_ptr(), k
    assert model.head.bias.requires_grad is False and model.conv.weight.requires_grad is True
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert_same_model(model, _copy_path(spec, sd))


def test_prefix_stripped_on_meta_path(mods: Path) -> None:
    spec = f"{MODS}:Plain"
    sd = _state(1, spec)
    wrapped = {f"module._orig_mod.{k}": v for k, v in sd.items()}
    result = fit_on_meta(arch_spec(spec), wrapped, source="ck.pt")
    assert result is not None
    assert result[1] == "stripped 'module._orig_mod.' prefix"
    assert_same_model(result[0], _copy_path(spec, sd))


def test_nonpersistent_buffer_falls_back_with_its_values(mods: Path, tmp_path: Path) -> None:
    spec = f"{MODS}:NonPersistent"
    sd = _state(2, spec)
    assert "index" not in sd
    assert fit_on_meta(arch_spec(spec), sd, source="ck.pt") is None
    torch.save(sd, tmp_path / "ck.pt")
    model = load_model(tmp_path / "ck.pt", arch=spec).model
    assert torch.equal(model.index, torch.arange(6).view(2, 3) * 2 + 1)
    assert_same_model(model, _copy_path(spec, sd))


def test_tied_weights_fall_back_and_stay_tied(mods: Path, tmp_path: Path) -> None:
    spec = f"{MODS}:Tied"
    sd = _state(3, spec)
    assert fit_on_meta(arch_spec(spec), sd, source="ck.pt") is None
    torch.save(sd, tmp_path / "ck.pt")
    model = load_model(tmp_path / "ck.pt", arch=spec).model
    assert model.dec.weight is model.enc.weight
    assert_same_model(model, _copy_path(spec, sd))


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_weight_norm_attribute_left_on_meta_falls_back(mods: Path, tmp_path: Path) -> None:
    spec = f"{MODS}:WeightNorm"
    sd = _state(4, spec)
    with torch.device("meta"):  # torch's own lazy imports done, so only the attribute makes it fall back
        on_meta = build_arch(spec)
    on_meta.load_state_dict(sd, assign=True)
    assert meta_leftovers(on_meta) == ["lin.weight"]
    assert fit_on_meta(arch_spec(spec), sd, source="ck.pt") is None  # lin.weight is a plain attribute
    torch.save(sd, tmp_path / "ck.pt")
    assert_same_model(load_model(tmp_path / "ck.pt", arch=spec).model, _copy_path(spec, sd))


def test_import_while_building_falls_back(mods: Path, tmp_path: Path) -> None:
    spec = f"{MODS}:lazy"
    sd = _state(5, f"{MODS}:Plain")
    sys.modules.pop(LAZY_DEP, None)
    assert fit_on_meta(arch_spec(spec), sd, source="ck.pt") is None
    assert LAZY_DEP not in sys.modules  # refused on meta, so its import-time tensor was not made there
    torch.save(sd, tmp_path / "ck.pt")
    assert_same_model(load_model(tmp_path / "ck.pt", arch=spec).model, _copy_path(spec, sd))
    assert not sys.modules[LAZY_DEP].CONST.is_meta
    sys.modules.pop(LAZY_DEP, None)
    spec = f"{MODS}:lazy_tolerant"  # the import refused, the factory builds another model: still falls back
    assert fit_on_meta(arch_spec(spec), sd, source="ck.pt") is None
    assert_same_model(load_model(tmp_path / "ck.pt", arch=spec).model, _copy_path(spec, sd))


def test_float64_architecture_float32_checkpoint(mods: Path) -> None:
    spec = f"{MODS}:Double"
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in _state(6, spec).items()}
    result = fit_on_meta(arch_spec(spec), sd, source="ck.pt")
    assert result is not None
    model = result[0]
    assert model.conv.weight.dtype == torch.float64 and model.bn.running_var.dtype == torch.float64
    assert model.bn.num_batches_tracked.dtype == torch.int64
    assert_same_model(model, _copy_path(spec, sd))


def test_shared_or_strided_checkpoint_tensors_are_copied(mods: Path) -> None:
    spec = f"{MODS}:Untied"
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(7))
    sd = {"a.weight": w, "b.weight": w}  # one storage under two names: must not tie a and b
    model = fit_on_meta(arch_spec(spec), sd, source="ck.pt")[0]  # type: ignore[index]
    assert model.a.weight.data_ptr() != model.b.weight.data_ptr()
    assert_same_model(model, _copy_path(spec, sd))
    t = torch.randn(4, 4, generator=torch.Generator().manual_seed(8)).t()  # not the architecture's strides
    sd = {"a.weight": t, "b.weight": t.contiguous()}
    model = fit_on_meta(arch_spec(spec), sd, source="ck.pt")[0]  # type: ignore[index]
    assert model.a.weight.stride() == (4, 1) and model.b.weight.data_ptr() == sd["b.weight"].data_ptr()
    assert_same_model(model, _copy_path(spec, sd))


def test_errors_are_the_copying_paths(mods: Path, tmp_path: Path) -> None:
    spec = f"{MODS}:Plain"
    sd = _state(9, spec)
    bad = {k: v for k, v in sd.items() if k != "head.bias"}
    bad["extra.weight"] = torch.ones(2)
    path = tmp_path / "ck.pt"
    torch.save(bad, path)
    with pytest.raises(ModelLoadError) as want:
        fit_state_dict(build_arch(spec), bad, source=str(path), arch=spec)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ModelLoadError) as got:
        load_model(path, arch=spec)
    assert str(got.value) == str(want.value)
    assert "1 missing (head.bias)" in str(got.value) and "1 unexpected (extra.weight)" in str(got.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_timm_resnet18_equals_the_copy_path(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    spec = "timm:resnet18"
    sd = _state(10, spec)
    assert fit_on_meta(arch_spec(spec), {k: v.clone() for k, v in sd.items()}, source="ck.pt") is not None
    torch.save(sd, tmp_path / "ck.pt")
    loaded = load_model(tmp_path / "ck.pt", arch=spec)
    assert loaded.kind == "state_dict"
    want = _copy_path(spec, sd)
    assert_same_model(loaded.model, want)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), want.eval()(x))
