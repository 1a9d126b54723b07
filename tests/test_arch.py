"""Arch specs with arguments: refused specs and arguments (CLI and API), built models, the plan round trip.

Bad-input rows run ``dsrewrite apply SPEC --recipe all_3x3 ...`` and assert exit 2,
exactly one ``error:`` line naming the problem, no traceback and an empty output
directory; the same rows raise :class:`~dsrewrite.errors.ModelLoadError` from the API.
User factories live in small modules written to ``tmp_path`` and put on ``sys.path``.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn

import dsrewrite
from cli_checks import assert_clean_cli_error, run_cli
from dsrewrite.cli import main
from dsrewrite.errors import ModelLoadError, PlanError
from dsrewrite.io import build_arch, load_model, load_rewrite, plan_path_for, save_rewrite
from dsrewrite.io.arch import ArchSpec, arch_spec, parse_arch_args
from dsrewrite.plan_types import Plan

smp = pytest.importorskip("segmentation_models_pytorch")
timm = pytest.importorskip("timm")

SHAPE_ARG = "1,3,32,32"
#: A three-stage U-Net (ResNet18 stem to layer2): the same code paths, a fraction of the rewrite time.
SMALL_UNET = {"encoder_depth": 3, "decoder_channels": [64, 32, 16]}
SMALL_UNET_ARGS = ["--arch-arg", "encoder_depth=3", "--arch-arg", "decoder_channels=[64, 32, 16]"]
FACTORIES = "dsr_test_factories"
EXITS_ON_IMPORT = "dsr_test_exits_on_import"
NEEDS_MISSING = "dsr_test_needs_missing"

_FACTORY_SOURCE = textwrap.dedent("""
    from torch import nn

    def returns_int():
        return 3

    def exits():
        raise SystemExit(0)

    def interrupts():
        raise KeyboardInterrupt

    def debugs():
        breakpoint()
        return nn.Identity()

    class NotAModule:
        pass

    def build(width: int = 8, depth: int = 2, act: bool = True):
        layers = []
        for i in range(depth):
            layers += [nn.Conv2d(3 if i == 0 else width, width, 3, padding=1)]
            if act:
                layers += [nn.ReLU()]
        return nn.Sequential(*layers)

    def untyped(width=8):
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1))

    def needs(width):
        return nn.Conv2d(3, width, 3)

    class Net(nn.Module):
        def __init__(self, width: int = 8):
            super().__init__()
            self.a = nn.Conv2d(3, width, 3, padding=1)
            self.b = nn.Conv2d(width, width, 3, padding=1)

        def forward(self, x):
            return self.b(self.a(x).relu())
""")


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "factories"
    d.mkdir()
    (d / f"{FACTORIES}.py").write_text(_FACTORY_SOURCE)
    (d / f"{EXITS_ON_IMPORT}.py").write_text("raise SystemExit(3)\n")
    (d / f"{NEEDS_MISSING}.py").write_text("import dsr_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(d))
    yield d
    for name in (FACTORIES, EXITS_ON_IMPORT, NEEDS_MISSING):
        sys.modules.pop(name, None)


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def x_in(shape: tuple[int, ...] = (1, 3, 32, 32), seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- refused specs and arguments

F = FACTORIES
BAD = [
    # (case, spec, arch args, fragments of the one error line)
    ("sys_exit", "sys:exit", [], ("'sys' is a python standard-library module",)),
    ("os_abort", "os:abort", [], ("'os' is a python standard-library module",)),
    ("builtins_breakpoint", "builtins:breakpoint", [], ("'builtins' is a python standard-library module",)),
    ("builtins_print", "builtins:print", [], ("'builtins' is a python standard-library module",)),
    ("os_path_join", "os.path:join", [], ("'os' is a python standard-library module",)),
    ("pdb", "pdb:set_trace", [], ("'pdb' is a python standard-library module",)),
    ("ipython", "IPython:embed", [], ("never used as a model factory",)),
    ("returns_int", f"{F}:returns_int", [], ("returns_int() returned a value of type int", "not a torch.nn.module")),
    ("raises_system_exit", f"{F}:exits", [], ("exits() exited (systemexit 0)",)),
    ("raises_keyboard_interrupt", f"{F}:interrupts", [], ("interrupts() was interrupted (keyboardinterrupt)",)),
    ("calls_breakpoint", f"{F}:debugs", [], ("debugs() called breakpoint()",)),
    ("exits_on_import", f"{EXITS_ON_IMPORT}:build", [], (f"importing '{EXITS_ON_IMPORT}' exited (systemexit 3)",)),
    ("import_needs_missing_package", f"{NEEDS_MISSING}:build", [],
     ("it needs 'dsr_missing_dependency_xyz', which is not installed",)),
    ("not_a_module_class", f"{F}:NotAModule", [], ("notamodule is a class but not a torch.nn.module subclass",)),
    ("private_attr", f"{F}:_hidden", [], ("'_hidden' is a private or dunder name",)),
    ("dunder_module", "__main__:build", [], ("'__main__' is a private or dunder name",)),
    ("unknown_module", "dsr_no_such_module:build", [], ("no module named 'dsr_no_such_module'",)),
    ("unknown_module_typo", "dsr_test_factorie:build", [], (f"(did you mean '{F}'?)",)),
    ("unknown_attr", f"{F}:biuld", [], (f"'{F}' has no 'biuld' (did you mean 'build'?)",)),
    ("missing_required_arg", f"{F}:needs", [], ("needs() needs argument 'width'", "--arch-arg width=value")),
    ("arg_without_equals", "smp:Unet", ["classes3"], ("--arch-arg 'classes3' is not name=value",)),
    ("arg_bad_name", "smp:Unet", ["3classes=3"], ("'3classes' is not an argument name",)),
    ("arg_twice", "smp:Unet", ["classes=3", "classes=4"], ("--arch-arg classes is given twice",)),
    ("arg_bad_yaml", "smp:Unet", ["decoder_channels=[1"], ("not a valid yaml value",)),
    ("smp_misspelt_arg", "smp:Unet", ["encoder_name=resnet18", "clases=3"],
     ("unet takes no argument 'clases' (did you mean 'classes'?)",)),
    ("smp_wrong_type", "smp:Unet", ["encoder_name=resnet18", "classes=three"],
     ("classes='three' is a str, but unet expects int",)),
    ("smp_encoder_weights", "smp:Unet", ["encoder_weights=imagenet"],
     ("encoder_weights='imagenet' would download or read pretrained weights",)),
    ("smp_unknown_encoder", "smp:Unet", ["encoder_name=resnet81"], ("unknown smp encoder 'resnet81' (did you mean 'resnet18'?)",)),
    ("smp_encoder_twice", "smp:Unet:resnet18", ["encoder_name=resnet34"], ("names the encoder twice",)),
    ("timm_misspelt_arg", "timm:resnet18", ["num_clases=7"],
     ("resnet18 takes no argument 'num_clases' (did you mean 'num_classes'?)",)),
    ("timm_pretrained", "timm:resnet18", ["pretrained=true"], ("pretrained=true would download",)),
    ("timm_checkpoint_path", "timm:resnet18", ["checkpoint_path=/etc/passwd"], ("checkpoint_path='/etc/passwd' would",)),
    ("tv_wrong_type", "torchvision:resnet18", ["num_classes=5.5"], ("num_classes=5.5 is a float",)),
    ("tv_weights", "torchvision:resnet18", ["weights=DEFAULT"], ("weights='default' would download",)),
    ("factory_misspelt_arg", f"{F}:build", ["widht=4"], ("build() takes no argument 'widht' (did you mean 'width'?)",)),
    ("factory_wrong_type_annotated", f"{F}:build", ["width=abc"], ("width='abc' is a str, but build() expects int",)),
    ("factory_rejects_value", f"{F}:untyped", ["width=abc"],
     (f"arch {F}:untyped (width='abc'): building the model failed (typeerror",)),
    ("demo_with_args", "demo", ["classes=3"], ("arch 'demo' takes no arch args",)),
]


@pytest.mark.parametrize("case,spec,args,fragments", BAD, ids=[row[0] for row in BAD])
def test_bad_arch_spec_cli(factories: Path, tmp_path: Path, case: str, spec: str, args: list[str],
                           fragments: tuple[str, ...]) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv: list[Any] = ["apply", spec, "--recipe", "all_3x3", "--input-shape", SHAPE_ARG, "-o", out_dir / "m.pt"]
    for a in args:
        argv += ["--arch-arg", a]
    previous_hook = sys.breakpointhook
    r = run_cli(argv)
    assert_clean_cli_error(case, r, fragments)
    assert r.stdout == "", f"{case}: {r.stdout!r}"
    assert listing(out_dir) == [], f"{case}: wrote {listing(out_dir)}"
    assert sys.breakpointhook is previous_hook, f"{case}: breakpoint hook not restored"


@pytest.mark.parametrize("case,spec,args,fragments", BAD, ids=[row[0] for row in BAD])
def test_bad_arch_spec_api(factories: Path, case: str, spec: str, args: list[str], fragments: tuple[str, ...]) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(spec, arch_args=parse_arch_args(args))
    msg = str(info.value)
    assert "\n" not in msg, f"{case}: {msg!r}"
    for frag in fragments:
        assert frag.lower() in msg.lower(), f"{case}: {frag!r} not in {msg!r}"


@pytest.mark.parametrize("setting", ["0", "pdb.set_trace", None])
def test_breakpoint_refused_whatever_pythonbreakpoint_says(factories: Path, monkeypatch: pytest.MonkeyPatch,
                                                           setting: str | None) -> None:
    if setting is None:
        monkeypatch.delenv("PYTHONBREAKPOINT", raising=False)
    else:
        monkeypatch.setenv("PYTHONBREAKPOINT", setting)
    hook = sys.breakpointhook
    with pytest.raises(ModelLoadError, match=r"debugs\(\) called breakpoint\(\)"):
        build_arch(f"{F}:debugs")
    assert sys.breakpointhook is hook


def test_hand_made_arch_spec_is_validated_again() -> None:
    with pytest.raises(ModelLoadError, match="standard-library"):
        build_arch(ArchSpec("sys:exit"))
    with pytest.raises(ModelLoadError, match="would download"):
        build_arch(ArchSpec("smp:Unet", (("encoder_weights", "imagenet"),)))


def test_arch_args_are_plain_data() -> None:
    with pytest.raises(ModelLoadError, match="'norm_layer' is a type; arch args are plain data"):
        arch_spec("torchvision:resnet18", {"norm_layer": nn.BatchNorm2d})


def test_arch_args_without_arch_spec(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(nn.Conv2d(3, 4, 3).state_dict(), path)
    with pytest.raises(ModelLoadError, match=r"arch args \(classes\) need an arch spec"):
        load_model(path, arch_args={"classes": 3})


@pytest.mark.parametrize("text,value", [
    ("3", 3), ("-2", -2), ("0.5", 0.5), ("1e-3", 1e-3), ("true", True), ("false", False), ("null", None),
    ("", None), ("resnet34", "resnet34"), ("'3'", "3"), ("[64, 32, 16]", [64, 32, 16]),
    ("{classes: 4}", {"classes": 4}), ("2024-01-02", "2024-01-02"), ("a=b", "a=b"),
])
def test_parse_arch_args_values(text: str, value: Any) -> None:
    got = parse_arch_args([f"x={text}"])["x"]
    assert got == value and type(got) is type(value), f"{text!r} -> {got!r} ({type(got).__name__})"


# ----------------------------------------------------------------------------- models built with arguments


def test_smp_with_args_cli_three_class_output(tmp_path: Path) -> None:
    out = tmp_path / "unet.ds.pt"
    r = run_cli(["apply", "smp:Unet", "--arch-arg", "encoder_name=resnet18", "--arch-arg", "classes=3",
                 *SMALL_UNET_ARGS, "--recipe", "all_3x3", "--input-shape", SHAPE_ARG, "-o", out])
    assert r.exit_code == 0, r.output
    plan = json.loads(plan_path_for(out).read_text())
    assert (plan["arch"], plan["arch_args"]) == ("smp:Unet", {"encoder_name": "resnet18", "classes": 3, **SMALL_UNET})
    saved = load_model(out).model.eval()
    rebuilt = load_rewrite(None, plan_path_for(out), out).eval()  # from the plan's arch + arch_args
    assert type(rebuilt) is type(saved) is smp.Unet
    x = x_in()
    with torch.no_grad():
        y_saved, y_rebuilt = saved(x), rebuilt(x)
    assert y_saved.shape == (1, 3, 32, 32)
    assert torch.equal(y_saved, y_rebuilt), f"max abs diff {(y_saved - y_rebuilt).abs().max().item():.3e}"


def test_timm_num_classes() -> None:
    torch.manual_seed(0)
    loaded = load_model("timm:resnet18", arch_args={"num_classes": 7, "in_chans": 1})
    assert loaded.arch == ArchSpec("timm:resnet18", (("num_classes", 7), ("in_chans", 1)))
    assert loaded.source == "timm:resnet18 (num_classes=7, in_chans=1) (random weights)"
    with torch.no_grad():
        assert loaded.model.eval()(x_in((2, 1, 32, 32))).shape == (2, 7)


def test_torchvision_num_classes() -> None:
    torch.manual_seed(0)
    model = build_arch("torchvision:resnet18", parse_arch_args(["num_classes=5"]))
    with torch.no_grad():
        assert model.eval()(x_in()).shape == (1, 5)


def test_user_factory_with_args_and_plan_trust(factories: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.ds.pt"
    r = run_cli(["apply", f"{F}:build", "--arch-arg", "width=16", "--arch-arg", "depth=3", "--arch-arg", "act=false",
                 "--recipe", "all_3x3", "--input-shape", SHAPE_ARG, "-o", out])
    assert r.exit_code == 0, r.output
    saved = load_model(out).model
    assert [m.out_channels for m in saved.modules() if isinstance(m, nn.Conv2d) and m.groups == 1][-1] == 16
    assert not any(isinstance(m, nn.ReLU) for m in saved.modules())
    plan_file = plan_path_for(out)
    assert json.loads(plan_file.read_text())["arch_args"] == {"width": 16, "depth": 3, "act": False}
    # a plan naming a factory does not make dsrewrite import code unless trusted
    with pytest.raises(ModelLoadError, match="never makes dsrewrite import and run code"):
        load_rewrite(None, plan_file, out)
    rebuilt = load_rewrite(None, plan_file, out, trust_arch=True)
    x = x_in()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), saved(x))


def test_class_factory_with_args(factories: Path) -> None:
    model = build_arch(f"{F}:Net", {"width": 4})
    assert type(model).__name__ == "Net" and model.b.out_channels == 4


def test_state_dict_with_arch_args_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = smp.Unet("resnet18", encoder_weights=None, classes=3, **SMALL_UNET).eval()
    sd_file = tmp_path / "unet_sd.pt"
    torch.save({"state_dict": trained.state_dict()}, sd_file)
    out = tmp_path / "unet.ds.pt"
    r = run_cli(["apply", sd_file, "--arch", "smp:Unet", "--arch-arg", "encoder_name=resnet18",
                 "--arch-arg", "classes=3", *SMALL_UNET_ARGS, "--recipe", "all_3x3", "--input-shape", SHAPE_ARG,
                 "-o", out])
    assert r.exit_code == 0, r.output
    x = x_in()
    expected = dsrewrite.rewrite(trained, "all_3x3", example_inputs=dsrewrite.example_input(trained, (1, 3, 32, 32)))
    torch.manual_seed(123)  # the rebuilt architecture's random init must not matter
    rebuilt = load_rewrite(None, plan_path_for(out), out).eval()
    with torch.no_grad():
        want, got = expected.eval()(x), rebuilt(x)
    assert got.shape == (1, 3, 32, 32)
    assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item():.3e}"


def test_old_plan_sidecar_without_arch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_arch("timm:resnet18", {"num_classes": 7}).eval()
    weights, plan_file = save_rewrite(model, Plan((), "all_3x3", "fx"), tmp_path / "m.pt")
    data = json.loads(plan_file.read_text())
    assert (data["arch"], data["arch_args"]) == (None, {})
    for key in ("arch", "arch_args"):  # a sidecar written before these keys existed
        del data[key]
    plan_file.write_text(json.dumps(data))
    assert Plan.from_json(plan_file.read_text()).arch is None
    with pytest.raises(ModelLoadError, match="records no arch spec"):
        load_rewrite(None, plan_file, weights)
    rebuilt = load_rewrite(build_arch("timm:resnet18", {"num_classes": 7}), plan_file, weights)
    assert torch.equal(rebuilt.fc.weight, model.fc.weight)


@pytest.mark.parametrize("arch,args,error,match", [
    ("smp:Unet", {"encoder_weights": "imagenet"}, ModelLoadError, "would download or read pretrained weights"),
    ("sys:exit", {}, ModelLoadError, "standard-library"),
    (3, {}, PlanError, "'arch' is 3"),
    ("smp:Unet", ["classes"], PlanError, "'arch_args' is"),
])
def test_plan_arch_refused(tmp_path: Path, arch: Any, args: Any, error: type, match: str) -> None:
    weights, plan_file = save_rewrite(nn.Conv2d(3, 3, 3), Plan((), "all_3x3", "fx"), tmp_path / "m.pt")
    data = json.loads(plan_file.read_text())
    data.update(arch=arch, arch_args=args)
    plan_file.write_text(json.dumps(data))
    with pytest.raises(error, match=match):
        load_rewrite(None, plan_file, weights)
