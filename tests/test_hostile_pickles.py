"""No code from a model file runs without --trust-pickle: hostile pickles on every entry point.

Each case (tests/hostile_pickles.py) is a torch file whose payload would create a marker
file. Every entry point that reads a model file (apply, plan, inspect, heal's MODEL and
--rewritten, load_rewrite) must refuse it with exit 2 (a typed UsageError in Python) and
one line naming the offending global or attribute, write nothing, and never create the
marker. A control test shows each firing payload is real: an unprotected
``torch.load(weights_only=False)`` (then ``state_dict()``/a forward call) creates it.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import hostile_pickles as hp
from cli_checks import assert_clean_cli_error
from dsrewrite.cli import main
from dsrewrite.errors import ModelLoadError, UsageError
from dsrewrite.io import load_rewrite, save_rewrite
from dsrewrite.plan_types import Plan

CASES = sorted(hp.cases(Path("/unused")))
LEGACY_CASES = ["os_system_reduce", "traversal_state_dict", "posix_system_in_dict", "shadowed_forward_partial",
                "hook_partial_constructor", "inst_opcode"]


def _listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.fixture()
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A marker path, an importable evil package (import = payload), a good model, data, an output dir."""
    marker = tmp_path / "PWNED"
    pkg_root = tmp_path / "site"
    hp.write_evil_package(pkg_root, marker)
    monkeypatch.syspath_prepend(str(pkg_root))
    sys.modules.pop("dsr_evil_pkg", None)
    torch.manual_seed(0)
    good = tmp_path / "good.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval(), good)
    data = tmp_path / "data.pt"
    torch.save(torch.randn(4, 3, 8, 8), data)
    out = tmp_path / "out"
    out.mkdir()
    yield {"marker": marker, "good": good, "data": data, "out": out, "root": tmp_path}
    sys.modules.pop("dsr_evil_pkg", None)


def _entry_points(evil: Path, s: dict[str, Path]) -> dict[str, list[str]]:
    out = s["out"]
    return {
        "apply": ["apply", evil, "--recipe", "all_3x3", "--input-shape", "1,3,8,8", "-o", out / "x.pt"],
        "plan": ["plan", evil, "--recipe", "all_3x3", "--input-shape", "1,3,8,8"],
        "inspect": ["inspect", evil, "--input-shape", "1,3,8,8"],
        "heal_model": ["heal", evil, "--rewritten", s["good"], "--data", s["data"], "--input-shape", "1,3,8,8",
                       "--steps", "1", "-o", out / "h.pt"],
        "heal_rewritten": ["heal", s["good"], "--rewritten", evil, "--data", s["data"], "--input-shape",
                           "1,3,8,8", "--steps", "1", "-o", out / "h.pt"],
    }


@pytest.mark.parametrize("case,legacy", [(c, False) for c in CASES] + [(c, True) for c in LEGACY_CASES],
                         ids=[c for c in CASES] + [f"{c}-legacy" for c in LEGACY_CASES])
def test_hostile_file_refused_everywhere(setup: dict[str, Path], case: str, legacy: bool) -> None:
    marker = setup["marker"]
    obj, fragment, _fires = hp.cases(marker)[case]
    evil = hp.write_case(obj, setup["root"] / f"{case}.pt", legacy=legacy)
    before = _listing(setup["out"])
    runner = CliRunner()
    for label, args in _entry_points(evil, setup).items():
        r = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert_clean_cli_error(f"{case}/{label}", r, (fragment,))
        assert not marker.exists(), f"{case}/{label}: the payload ran"
        assert _listing(setup["out"]) == before, f"{case}/{label}: something was written"
    # Python: load_rewrite reads the weights file through the same loader
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    (setup["root"] / "plan_src").mkdir()
    _w, plan_file = save_rewrite(fresh, Plan((), "all_3x3", "fx"), setup["root"] / "plan_src" / "m.pt")
    with pytest.raises(UsageError) as info:
        load_rewrite(fresh, plan_file, evil)
    assert fragment in str(info.value), str(info.value)
    assert not marker.exists(), f"{case}/load_rewrite: the payload ran"
    assert "dsr_evil_pkg" not in sys.modules, "an unadmitted module was imported"


@pytest.mark.parametrize("case", [c for c in CASES if hp.cases(Path("/x"))[c][2]])
def test_payloads_are_real(setup: dict[str, Path], case: str) -> None:
    """Control: an unprotected load (and use) of the same file does run the payload."""
    marker = setup["marker"]
    obj, _fragment, _fires = hp.cases(marker)[case]
    evil = hp.write_case(obj, setup["root"] / f"{case}.pt")
    hp.plain_load_and_use(evil)
    deadline = time.monotonic() + 5  # subprocess.Popen runs asynchronously
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"{case}: the payload is inert under a plain load, so its refusal proves nothing"


def test_traversal_names_resolve_to_os_system() -> None:
    """The dotted names of the traversal cases really reach os.system by attribute traversal."""
    import torch.nn.functional as F

    assert functools.reduce(getattr, "os.system".split("."), torch.serialization) is os.system
    assert functools.reduce(getattr, "torch.serialization.os.system".split("."), F) is os.system


def test_trust_pickle_is_the_only_way_to_run_code(setup: dict[str, Path]) -> None:
    """With --trust-pickle the file is read by plain torch.load (documented opt-in): the payload runs."""
    marker = setup["marker"]
    obj, _f, _fires = hp.cases(marker)["os_system_reduce"]
    evil = hp.write_case(obj, setup["root"] / "evil.pt")
    r = CliRunner().invoke(main, ["inspect", str(evil), "--trust-pickle", "--input-shape", "1,3,8,8"])
    assert marker.exists(), "the opt-in path did not load the file plainly"
    assert r.exit_code == 2  # an int is not a model
    assert "warning: " in r.stderr and "--trust-pickle" in r.stderr and "runs whatever code" in r.stderr, r.stderr


def test_allow_module_admits_a_named_package(setup: dict[str, Path]) -> None:
    """A package that is not imported is refused with the way out; --allow-module admits it."""
    marker = setup["marker"]
    path = hp.write_case(hp.New(hp.Ref("dsr_evil_pkg", "Model"), dict(vars(nn.Module()))), setup["root"] / "m.pt")
    r = CliRunner().invoke(main, ["inspect", str(path), "--input-shape", "1,3,8,8"])
    assert_clean_cli_error("no allow", r, ("--allow-module dsr_evil_pkg",))
    assert not marker.exists()
    r = CliRunner().invoke(main, ["inspect", str(path), "--allow-module", "dsr_evil_pkg", "--input-shape", "1,3,8,8"])
    assert marker.exists(), "the named package was not imported"
    # loaded: what fails now is running the (forward-less) model, not the loader
    assert_clean_cli_error("allowed", r, ("capture:", "missing the required \"forward\""))


def test_python_api_refuses_with_typed_error(setup: dict[str, Path]) -> None:
    from dsrewrite.io import load_model

    obj, fragment, _ = hp.cases(setup["marker"])["traversal_state_dict"]
    evil = hp.write_case(obj, setup["root"] / "evil.pt")
    with pytest.raises(ModelLoadError, match="torch.serialization.os.system"):
        load_model(evil)
    assert not setup["marker"].exists()


def _rewrite_zip(path: Path, rename: dict[str, str], extra: dict[str, bytes]) -> None:
    import zipfile

    with zipfile.ZipFile(path) as zf:
        entries = [(i.filename, zf.read(i.filename)) for i in zf.infolist()]
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            zf.writestr(rename.get(name, name), data)
        for name, data in extra.items():
            zf.writestr(name, data)


def test_scan_sees_the_pickle_torch_reads(setup: dict[str, Path]) -> None:
    """A hostile data.pkl under another case, beside a harmless decoy data.pkl: refused (found in review)."""
    import zipfile

    marker = setup["marker"]
    evil = hp.write_case(hp.Call(hp.Ref("hostile_pickles", "MarkerModule"), (str(marker),)), setup["root"] / "e.pt")
    decoy = hp.write_case(hp.New(hp.Ref("hostile_pickles", "MarkerModule"), hp.linear_state()), setup["root"] / "d.pt")
    with zipfile.ZipFile(decoy) as zf:
        decoy_pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    with zipfile.ZipFile(evil) as zf:
        pkl = next(n for n in zf.namelist() if n.endswith("data.pkl"))
    _rewrite_zip(evil, {pkl: pkl[: -len("data.pkl")] + "DATA.PKL"}, {pkl[: -len("data.pkl")] + "x/data.pkl": decoy_pkl})
    r = CliRunner().invoke(main, ["inspect", str(evil), "--input-shape", "1,3,8,8"])
    assert r.exit_code == 2 and not marker.exists(), r.output


def test_legacy_system_info_pickle_is_scanned(setup: dict[str, Path]) -> None:
    """A legacy file's third pickle (system info) is unpickled by torch too: it is scanned (found in review)."""
    import io
    import pickletools

    marker = setup["marker"]
    path = setup["root"] / "legacy.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path, _use_new_zipfile_serialization=False)
    blob = path.read_bytes()
    buf = io.BytesIO()
    hp.HostilePickler(buf, protocol=2).dump(hp.Call(hp.Ref("hostile_pickles", "MarkerModule"), (str(marker),)))
    # replace the system-info pickle (the third) by the payload
    f = io.BytesIO(blob)
    bounds = []
    for _ in range(3):
        start = f.tell()
        for _op in pickletools.genops(f):
            pass
        bounds.append((start, f.tell()))
    path.write_bytes(blob[: bounds[2][0]] + buf.getvalue() + blob[bounds[2][1]:])
    from dsrewrite.io import load_model

    with pytest.raises(UsageError, match="MarkerModule"):
        load_model(path)
    assert not marker.exists()


def test_enum_members_untouched_after_a_refused_file(setup: dict[str, Path]) -> None:
    from torchvision.transforms.functional import InterpolationMode

    obj, _f, _ = hp.cases(setup["marker"])["enum_member_state"]
    path = hp.write_case(obj, setup["root"] / "enum.pt")
    with pytest.raises(UsageError):
        from dsrewrite.io import load_model

        load_model(path)
    assert InterpolationMode.BILINEAR.value == "bilinear"


def test_heal_never_overwrites_its_inputs_or_an_unnamed_checkpoint(setup: dict[str, Path]) -> None:
    """Found in review: heal's --checkpoint overwrote any file, and -o --force overwrote MODEL."""
    good, data, root = setup["good"], setup["data"], setup["root"]
    precious = root / "precious.txt"
    precious.write_text("keep me")
    student = root / "student.pt"
    student.write_bytes(good.read_bytes())
    base = ["heal", good, "--rewritten", student, "--data", data, "--input-shape", "1,3,8,8", "--steps", "1"]
    cases = {
        "checkpoint clobbers a file": base + ["-o", root / "h.pt", "--checkpoint", precious],
        "checkpoint is the student": base + ["-o", root / "h.pt", "--checkpoint", student, "--force"],
        "output is the teacher": base + ["-o", good, "--force"],
    }
    before = {p: p.read_bytes() for p in (good, student, precious)}
    for label, args in cases.items():
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert_clean_cli_error(label, r, ())
        assert {p: p.read_bytes() for p in before} == before, f"{label}: an input changed"
    assert not (root / "h.pt").exists()


def test_calibration_and_example_input_files_with_a_payload(setup: dict[str, Path]) -> None:
    """Data files are read weights-only: a payload is refused by name, without advice to load it unsafely."""
    marker = setup["marker"]
    evil = hp.write_case([hp.Call(hp.Ref("posix", "system"), (f"touch {marker}",))], setup["root"] / "calib.pt")
    for flag in ("--calib", "--example-inputs"):
        shape = ["--input-shape", "1,3,8,8"] if flag == "--calib" else []
        r = CliRunner().invoke(main, ["apply", str(setup["good"]), "--recipe", "all_3x3", *shape,
                                      flag, str(evil), "-o", str(setup["out"] / "x.pt")])
        assert_clean_cli_error(flag, r, ("posix.system", "weights-only"))
        assert "will likely succeed" not in r.stderr, r.stderr
        assert not marker.exists()
