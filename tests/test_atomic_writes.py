"""Interrupted and racing writes leave one complete output or none, and no temp files (issue 13, kinds 9, 10, 12).

- SIGTERM / SIGHUP while ``dsrewrite apply`` saves: the process ends by that signal, with
  neither output nor temp file left. SIGKILL cannot be caught: its temp file (named with the
  dead pid) is removed by the next run to the same path.
- Two writers of one new path without ``--force``: exactly one succeeds, the other gets an
  "already exists" error (exit 2 on the command line); the files are complete and belong to
  one writer. A control run with ``overwrite=True`` (plain ``os.replace``) lets both
  succeed, so the race test can tell the two apart.
- A full disk or a file size limit during ``torch.save`` is reported as such, not as torch's
  "unexpected pos": with a real kernel failure (``RLIMIT_FSIZE``; a tiny tmpfs where a mount
  namespace can be made) and a simulated one.

The children are real processes (``subprocess``); the signal tests make ``torch.save`` pause
once the temp file is complete, so the signal lands in the writer.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from dsrewrite.errors import OutputError
from dsrewrite.io import load_model
from dsrewrite.runtime import files
from dsrewrite.runtime.files import atomic_save, atomic_write, atomic_write_all
from dsrewrite.runtime.temp_files import is_our_temp, remove_stale_temps, removed_on_signals, temp_name

ROOT = Path(__file__).resolve().parents[1]
TEMP = re.compile(r"\..*\.dsrewrite-(\d+)-[0-9a-f]{8}\.(tmp|bak)")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def _temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if TEMP.fullmatch(p.name))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.save(_net(), tmp_path / "net.pt")
    return tmp_path / "net.pt"


def _apply_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["apply", str(model), "--recipe", "all_3x3", "--input-shape", "1,3,16,16", "-o", str(out), *extra]


# A child that runs `dsrewrite apply` with torch.save pausing (60 s) once it has filled the temp file.
_PAUSING_CHILD = """
import sys, time, torch
real_save = torch.save
def pausing_save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    f.flush()
    open(sys.argv[1], "w").write("in the writer")
    time.sleep(60)
torch.save = pausing_save
from dsrewrite.cli import main
main(sys.argv[2:])
"""


def _start_pausing_apply(tmp_path: Path, model: Path, out: Path) -> tuple[subprocess.Popen[str], Path]:
    child = tmp_path / "child.py"
    child.write_text(_PAUSING_CHILD, encoding="utf-8")
    marker = tmp_path / "in_writer"
    proc = subprocess.Popen([sys.executable, str(child), str(marker), *_apply_args(model, out)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out_, err = proc.communicate()
            pytest.fail(f"the child never reached the writer (exit {proc.returncode}):\n{out_}\n{err}")
        time.sleep(0.05)
    return proc, marker


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_signal_during_save_leaves_nothing(tmp_path: Path, model_file: Path, sig: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "light.pt"
    proc, _ = _start_pausing_apply(tmp_path, model_file, out)
    during = _temps(out_dir)
    assert during and all(TEMP.fullmatch(n).group(1) == str(proc.pid) for n in during), \
        f"no temp file of the child (pid {proc.pid}) while it was saving: {sorted(os.listdir(out_dir))}"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -getattr(signal, sig), f"exit {proc.returncode}, expected -{sig}:\n{err}"
    assert sorted(os.listdir(out_dir)) == [], f"left behind after {sig}: {sorted(os.listdir(out_dir))}"


def test_sigkill_during_save_leaves_a_temp_the_next_run_removes(tmp_path: Path, model_file: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "light.pt"
    proc, _ = _start_pausing_apply(tmp_path, model_file, out)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    left = sorted(os.listdir(out_dir))
    assert left and all(TEMP.fullmatch(n) and TEMP.fullmatch(n).group(1) == str(proc.pid) for n in left), left
    assert not out.exists(), "a killed writer must not leave a (partial) output"
    r = subprocess.run([sys.executable, "-m", "dsrewrite", *_apply_args(model_file, out)], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out_dir)) == ["light.plan.json", "light.pt"], "the stale temp file was not removed"
    assert load_model(out).kind == "module"


def test_temp_names_and_stale_cleanup(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)  # a process that has ended
    dead = tmp_path / f".m.pt.dsrewrite-{dead_pid}-0123abcd.tmp"
    dead_bak = tmp_path / f".m.pt.dsrewrite-{dead_pid}-89abcdef.bak"
    live = temp_name(path)  # this process's: alive
    other_path = tmp_path / f".other.pt.dsrewrite-{dead_pid}-0123abcd.tmp"  # another output's: not ours to touch
    lookalike = tmp_path / ".m.pt.dsrewrite-12-xyz.tmp"  # not our pattern
    for p in (dead, dead_bak, live, other_path, lookalike):
        p.write_bytes(b"x")
    assert is_our_temp(live, path) and is_our_temp(dead, path) and not is_our_temp(lookalike, path)
    atomic_write(path, lambda f: f.write(b"new"))
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (path, live, other_path, lookalike))
    assert remove_stale_temps(path) == []


def test_previous_python_handler_is_called_and_restored(tmp_path: Path) -> None:
    """A program's own SIGTERM handler still decides; if it raises, the temp file goes; handlers come back."""

    class Stop(BaseException):
        pass

    def handler(signum: int, frame: Any) -> None:
        raise Stop

    before = signal.signal(signal.SIGTERM, handler)
    try:
        def write(f: Any) -> None:
            f.write(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs here

        t0 = time.monotonic()
        with pytest.raises(Stop):
            atomic_write(tmp_path / "x.bin", write)
        assert time.monotonic() - t0 < 4
        assert os.listdir(tmp_path) == []
        assert signal.getsignal(signal.SIGTERM) is handler
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL or hasattr(signal, "SIGHUP")
    finally:
        signal.signal(signal.SIGTERM, before)


def test_ignored_signal_stays_ignored(tmp_path: Path) -> None:
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        temps = [tmp_path / "t"]
        temps[0].write_bytes(b"x")
        with removed_on_signals(temps):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert temps[0].exists() and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


# Two writers, one barrier per trial: both wait for go_<i> and then write the same new pair of paths.
_RACER = """
import json, os, sys, time
from pathlib import Path
from dsrewrite.errors import OutputError
from dsrewrite.runtime.files import atomic_write_all
d, me, trials, overwrite = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
results = []
for i in range(trials):
    (d / f"ready_{i}_{me}").write_text("")
    while not (d / f"go_{i}").exists():
        time.sleep(0.001)
    body = me.encode() * 500_000  # 500 kB: the write takes a while, so the two overlap
    try:
        atomic_write_all([(d / f"out{i}.pt", lambda f: f.write(body)), (d / f"out{i}.plan.json", lambda f: f.write(me.encode()))],
                         overwrite=overwrite)
        results.append("ok")
    except OutputError as exc:
        results.append(str(exc))
print(json.dumps(results))
"""


def _race(d: Path, trials: int, overwrite: bool) -> list[list[str]]:
    d.mkdir()
    script = d.parent / "racer.py"
    script.write_text(_RACER, encoding="utf-8")
    procs = [subprocess.Popen([sys.executable, str(script), str(d), me, str(trials), "1" if overwrite else "0"],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me in ("A", "B")]
    for i in range(trials):
        deadline = time.monotonic() + 120
        while not all((d / f"ready_{i}_{me}").exists() for me in ("A", "B")):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a racer stopped"
            time.sleep(0.002)
        (d / f"go_{i}").write_text("")
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outs


@pytest.mark.parametrize("overwrite", [False, True], ids=["exclusive", "control: os.replace"])
def test_two_writers_race(tmp_path: Path, overwrite: bool) -> None:
    trials = 20
    a, b = _race(tmp_path / "race", trials, overwrite)
    d = tmp_path / "race"
    for i in range(trials):
        wins = [me for me, res in (("A", a[i]), ("B", b[i])) if res == "ok"]
        weights, plan = (d / f"out{i}.pt").read_bytes(), (d / f"out{i}.plan.json").read_bytes()
        assert len(weights) == 500_000 and len(set(weights)) == 1, f"trial {i}: the output is not one writer's"
        if overwrite:  # the control: nothing stops the second writer, both report success
            assert wins == ["A", "B"], f"trial {i}: {a[i]!r} / {b[i]!r}"
            continue
        assert len(wins) == 1, f"trial {i}: {len(wins)} writers succeeded: {a[i]!r} / {b[i]!r}"
        loser = b[i] if wins == ["A"] else a[i]
        assert "already exists" in loser, loser
        assert weights == wins[0].encode() * 500_000 and plan == wins[0].encode(), \
            f"trial {i}: the model and its plan come from different writers"
    assert _temps(d) == [], f"temp files left: {_temps(d)}"


def test_exclusive_create_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where os.link is unsupported, O_EXCL + copy: still complete, still never replaces a file."""

    def no_link(*_a: Any, **_k: Any) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / "o.bin"
    atomic_write(path, lambda f: f.write(b"first" * 100_000), overwrite=False)
    assert path.read_bytes() == b"first" * 100_000
    with pytest.raises(OutputError, match="already exists"):
        atomic_write(path, lambda f: f.write(b"second"), overwrite=False)
    assert path.read_bytes() == b"first" * 100_000 and sorted(os.listdir(tmp_path)) == ["o.bin"]


class _FullAfter:
    """A file whose writes fail with ENOSPC once ``limit`` bytes are written (as a full disk would)."""

    def __init__(self, f: Any, limit: int) -> None:
        self._f, self._left = f, limit

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self._left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._left -= n
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> "_FullAfter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()


def test_disk_full_inside_torch_save_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save turns the stream's ENOSPC into RuntimeError("unexpected pos"); the writer names the disk."""
    real_fdopen = os.fdopen
    monkeypatch.setattr(files.os, "fdopen", lambda *a, **k: _FullAfter(real_fdopen(*a, **k), 20_000))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # what torch alone says
        torch.save(_net(), _FullAfter(io.BytesIO(), 20_000))
    with pytest.raises(OutputError) as info:
        atomic_save(_net(), tmp_path / "m.pt")
    assert "the disk is full" in str(info.value) and "No space left on device" in str(info.value)
    assert str(tmp_path / "m.pt") in str(info.value) and "unexpected pos" not in str(info.value)
    assert os.listdir(tmp_path) == []


_FSIZE_CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that the write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from dsrewrite.cli import main
main(sys.argv[2:])
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="no RLIMIT_FSIZE/SIGXFSZ here")
def test_file_size_limit_while_saving_is_named(tmp_path: Path, model_file: Path) -> None:
    """A real kernel failure: the process may write at most 20 kB per file, the model is ~40 kB."""
    child = tmp_path / "child.py"
    child.write_text(_FSIZE_CHILD, encoding="utf-8")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = subprocess.run([sys.executable, str(child), "20000", *_apply_args(model_file, out_dir / "light.pt")],
                       env=_env(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "light.pt" in lines[0] and "File too large" in lines[0] and "unexpected pos" not in lines[0], lines[0]
    assert os.listdir(out_dir) == []


@pytest.mark.skipif(shutil.which("unshare") is None or sys.platform != "linux", reason="needs unshare (Linux)")
def test_real_full_disk_on_a_tiny_tmpfs(tmp_path: Path, model_file: Path) -> None:
    """A 64 kB tmpfs in a private mount namespace (skipped where one cannot be made): the model does not fit."""
    out_dir = tmp_path / "tiny"
    out_dir.mkdir()
    cmd = (f"mount -t tmpfs -o size=64k tmpfs {out_dir} || exit 77; "
           f"{sys.executable} -m dsrewrite {' '.join(_apply_args(model_file, out_dir / 'light.pt', '--input-shape', '1,3,16,16'))}; "
           f"echo rc=$?; ls -A {out_dir}")
    big = tmp_path / "big.pt"  # 2.3 MB; about 0.3 MB rewritten: neither fits
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Conv2d(3, 256, 3, padding=1), nn.Conv2d(256, 256, 3, padding=1)).eval(), big)
    cmd = cmd.replace(str(model_file), str(big))
    r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], env=_env(), capture_output=True, text=True, timeout=300)
    if r.returncode == 77 or "unshare failed" in r.stderr or "Operation not permitted" in r.stderr:
        pytest.skip(f"no private tmpfs here: {r.stderr.strip()[:200]}")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "rc=2" in r.stdout, r.stdout + r.stderr
    assert len(lines) == 1 and "light.pt" in lines[0] and "No space left on device" in lines[0], lines
    assert r.stdout.strip().splitlines()[-1] == "rc=2", f"left on the tmpfs: {r.stdout!r}"


@pytest.mark.slow
def test_two_cli_writers_race(tmp_path: Path, model_file: Path) -> None:
    """20 trials of two `dsrewrite apply` processes writing the same new -o without --force."""
    for trial in range(20):
        d = tmp_path / f"t{trial}"
        d.mkdir()
        out = d / "light.pt"
        procs = [subprocess.Popen([sys.executable, "-m", "dsrewrite", *_apply_args(model_file, out)], env=_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        res = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
        codes = sorted(c for c, _ in res)
        assert codes == [0, 2], f"trial {trial}: exit codes {codes}: {res}"
        err = next(e for c, e in res if c == 2)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "already exists" in lines[0], err
        assert sorted(os.listdir(d)) == ["light.plan.json", "light.pt"], os.listdir(d)
        assert load_model(out).kind == "module"
