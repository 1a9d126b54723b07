"""Every output path of a command is checked together, before any work (issue 13, kind 5).

Each row of the table is a command whose outputs cannot all be written as asked: a device
node, a FIFO or a directory (even with ``--force``), two outputs that are one file (equal
paths, a symlink, a hard link), or an output that is one of the inputs. Each must exit 2
with one ``error:`` line, before the model is even loaded (the loader is replaced by a
sentinel that records a call), leaving the folder's listing (hidden files included) and the
input unchanged. A control row with distinct outputs reaches the loader, so the sentinel
can tell.
"""

from __future__ import annotations

import importlib
import os
import stat
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from cli_checks import assert_clean_cli_error, run_cli
from dsrewrite.errors import OutputError
from dsrewrite.io import check_outputs


class Loaded(Exception):
    """Raised by the sentinel loader: the command got past its output checks."""


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with a model file, a recipe, calibration data and a 'rewritten' file; the loaders are sentinels."""
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), tmp_path / "model.pt")
    (tmp_path / "recipe.yaml").write_text("name: r\nselect: {kernel_size: ['3x3']}\n", encoding="utf-8")
    torch.save(torch.zeros(2, 3, 8, 8), tmp_path / "calib.pt")
    (tmp_path / "light.pt").write_bytes(b"rewritten model")
    (tmp_path / "dir.pt").mkdir()

    def sentinel(*_a: Any, **_k: Any) -> Any:
        (tmp_path.parent / f"{tmp_path.name}.loaded").write_text("x")
        raise Loaded("the model was loaded: the output checks came too late")

    for name in ("apply", "heal"):  # the modules (dsrewrite.cli's attributes of these names are the commands)
        monkeypatch.setattr(importlib.import_module(f"dsrewrite.cli.{name}"), "load_model_arg", sentinel)
    return tmp_path


def _fifo(d: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(d / "fifo.pt")
    return d / "fifo.pt"


def _symlink(d: Path, name: str, target: str) -> Path:
    (d / name).symlink_to(d / target)  # the target need not exist yet
    return d / name


def _hardlink(d: Path, name: str, target: str) -> Path:
    os.link(d / target, d / name)
    return d / name


APPLY = ["apply", "{d}/model.pt", "--recipe", "all_3x3"]
HEAL = ["heal", "{d}/model.pt", "--rewritten", "{d}/light.pt", "--data", "{d}/calib.pt"]

# (id, setup(d) run before the command, arguments, fragments of the error line)
CASES: list[tuple[str, Callable[[Path], Any], list[str], list[str]]] = [
    ("-o device node with --force", lambda d: None, APPLY + ["-o", "/dev/null", "--force"],
     ["/dev/null", "character device", "not a regular file"]),
    ("-o FIFO with --force", _fifo, APPLY + ["-o", "{d}/fifo.pt", "--force"], ["fifo.pt", "FIFO"]),
    ("--report is the plan sidecar", lambda d: None, APPLY + ["-o", "{d}/out.pt", "--report", "{d}/out.plan.json"],
     ["--report", "out.plan.json", "same file as the plan sidecar"]),
    ("--report is -o", lambda d: None, APPLY + ["-o", "{d}/out.json", "--report", "{d}/out.json"],
     ["--report", "same file as -o"]),
    ("--plot is -o", lambda d: None, APPLY + ["-o", "{d}/out.png", "--plot", "{d}/out.png"],
     ["--plot", "same file as -o"]),
    ("-o symlink to the input", lambda d: _symlink(d, "link.pt", "model.pt"),
     APPLY + ["-o", "{d}/link.pt", "--force"], ["-o", "link.pt", "same file as the input MODEL"]),
    ("-o hard link to the input", lambda d: _hardlink(d, "hard.pt", "model.pt"),
     APPLY + ["-o", "{d}/hard.pt", "--force"], ["-o", "hard.pt", "same file as the input MODEL"]),
    ("--plot hard link to the input", lambda d: _hardlink(d, "hard.png", "model.pt"),
     APPLY + ["-o", "{d}/out.pt", "--plot", "{d}/hard.png"], ["--plot", "same file as the input MODEL"]),
    ("two outputs via a symlink (--report → plan sidecar)", lambda d: _symlink(d, "r.json", "out.plan.json"),
     APPLY + ["-o", "{d}/out.pt", "--report", "{d}/r.json", "--force"], ["--report", "r.json", "plan sidecar"]),
    ("two outputs via a hard link (--report ↔ -o)", lambda d: (
        (d / "out.json").write_bytes(b"old"), _hardlink(d, "r.json", "out.json")),
     APPLY + ["-o", "{d}/out.json", "--report", "{d}/r.json", "--force"], ["--report", "r.json", "same file as -o"]),
    ("-o is the --calib file", lambda d: None,
     APPLY + ["--calib", "{d}/calib.pt", "-o", "{d}/calib.pt", "--force"], ["same file as the input --calib"]),
    ("-o is the --recipe file", lambda d: None,
     ["apply", "{d}/model.pt", "--recipe", "{d}/recipe.yaml", "-o", "{d}/recipe.yaml", "--force"],
     ["same file as the input --recipe"]),
    ("--report is the input (dry run)", lambda d: _symlink(d, "m.json", "model.pt"),
     APPLY + ["--dry-run", "--report", "{d}/m.json"], ["--report", "same file as the input MODEL"]),
    ("heal: --checkpoint is -o", lambda d: None, HEAL + ["-o", "{d}/healed.pt", "--checkpoint", "{d}/healed.pt"],
     ["--checkpoint", "same file as -o"]),
    ("heal: -o hard link to --rewritten", lambda d: _hardlink(d, "h.pt", "light.pt"),
     HEAL + ["-o", "{d}/h.pt", "--force"], ["-o", "same file as the input --rewritten"]),
    ("heal: -o device node with --force", lambda d: None, HEAL + ["-o", "/dev/null", "--force"],
     ["character device"]),
    ("heal: --checkpoint FIFO with --force", _fifo, HEAL + ["-o", "{d}/healed.pt", "--checkpoint", "{d}/fifo.pt",
                                                           "--force"], ["--checkpoint", "FIFO"]),
]


def _listing(d: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry (hidden ones too) with its type bits, size and mtime."""
    out = {}
    for p in sorted(d.rglob("*")):
        st = os.lstat(p)
        out[str(p.relative_to(d))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("label,setup,args,fragments", CASES, ids=[c[0] for c in CASES])
def test_outputs_refused_before_any_work(work: Path, label: str, setup: Callable[[Path], Any], args: list[str],
                                         fragments: list[str]) -> None:
    setup(work)
    before, model_bytes = _listing(work), (work / "model.pt").read_bytes()
    dev_null = os.stat("/dev/null")
    t0 = time.perf_counter()
    r = run_cli([a.format(d=work) for a in args])
    seconds = time.perf_counter() - t0
    assert not (work.parent / f"{work.name}.loaded").exists(), f"{label}: the model was loaded before the check"
    assert_clean_cli_error(label, r, fragments)
    assert _listing(work) == before, f"{label}: the folder changed"
    assert (work / "model.pt").read_bytes() == model_bytes
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and os.stat("/dev/null").st_rdev == dev_null.st_rdev
    assert seconds < 10, f"{label}: {seconds:.1f} s: the refusal should come before any work"


@pytest.mark.parametrize("args", [APPLY + ["-o", "{d}/dir.pt", "--force"],
                                  APPLY + ["--report", "{d}/dir.pt", "--force"],
                                  HEAL + ["-o", "{d}/h.pt", "--checkpoint", "{d}/dir.pt", "--force"]],
                         ids=["-o", "--report", "heal --checkpoint"])
def test_directory_output_refused_by_click_first(work: Path, args: list[str]) -> None:
    """A directory as an output is refused by click's own option check (``dir_okay=False``), in click's
    usage-error form (exit 2, "is a directory"), before our check; ``check_outputs`` refuses it too (below)."""
    before = _listing(work)
    r = run_cli([a.format(d=work) for a in args])
    assert r.exit_code == 2 and "is a directory" in r.stderr and "Traceback" not in r.output, r.output
    assert not (work.parent / f"{work.name}.loaded").exists()
    assert _listing(work) == before


def test_distinct_outputs_reach_the_loader(work: Path) -> None:
    """The control: the same command with distinct, writable outputs gets past the checks (to the sentinel)."""
    r = run_cli([a.format(d=work) for a in APPLY + ["-o", "{d}/out.pt", "--report", "{d}/r.json",
                                                    "--plot", "{d}/p.png"]])
    assert (work.parent / f"{work.name}.loaded").exists(), r.output
    assert r.exit_code == 1 and "the output checks came too late" in r.output


def test_check_outputs_api(tmp_path: Path) -> None:
    """The function the commands call, directly: hard links between outputs, replaceable outputs, labels."""
    (tmp_path / "a.pt").write_bytes(b"a")
    os.link(tmp_path / "a.pt", tmp_path / "b.json")
    with pytest.raises(OutputError, match=r"--report .*b\.json is the same file as -o .*a\.pt"):
        check_outputs({"-o": tmp_path / "a.pt", "--report": tmp_path / "b.json"}, force=True)
    (tmp_path / "r.json").write_bytes(b"{}")
    with pytest.raises(OutputError, match=r"^-o: output .*a\.pt already exists|^output .*a\.pt already exists"):
        check_outputs({"-o": tmp_path / "a.pt", "--report": tmp_path / "r.json"}, replaceable=("--report",))
    got = check_outputs({"-o": tmp_path / "new.pt", "--report": tmp_path / "r.json", "--plot": None},
                        replaceable=("--report",))
    assert got == {"-o": tmp_path / "new.pt", "--report": tmp_path / "r.json"}
    with pytest.raises(OutputError, match="--report: output .*sub is a directory; pass a file path to --report"):
        (tmp_path / "sub").mkdir()
        check_outputs({"--report": tmp_path / "sub"}, force=True)


def test_plan_sweep_plot_never_overwrites_an_input(tmp_path: Path) -> None:
    """`plan --sweep-plot` naming the model file is refused before any work (it was replaced with force)."""
    from cli_checks import assert_clean_cli_error, run_cli

    torch.manual_seed(0)
    model = tmp_path / "m.pt"
    torch.save(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1)), model)
    before = model.read_bytes()
    r = run_cli(["plan", model, "--recipe", "all_3x3", "--input-shape", "1,16,8,8", "--budget-sweep", "0.5", "--sweep-plot", model])
    assert_clean_cli_error("--sweep-plot = MODEL", r, ["--sweep-plot", "is the same file as the input MODEL"])
    assert model.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]
