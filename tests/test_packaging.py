# SPDX-License-Identifier: Apache-2.0
"""Packaging: the license (file, SPDX string, per-file headers), the version in one place, and a command line
whose help, version and completion do not import torch (docs/architecture.md records the time)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import dsrewrite

ROOT = Path(__file__).resolve().parent.parent
SPDX = "# SPDX-License-Identifier: Apache-2.0"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_source_file_carries_the_spdx_header() -> None:
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "dsrewrite").rglob("*.py"))
               if SPDX not in p.read_text(encoding="utf-8").splitlines()[:2]]
    assert not missing, f"add {SPDX!r} as the first line of: {missing}"


def test_license_file_and_expression_agree() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text.splitlines()[0] and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the whole text, not a stub
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]


def test_the_version_lives_in_one_place() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dsrewrite.__version__"}
    try:
        installed = importlib.metadata.version("dsrewrite")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("dsrewrite is not installed (no package metadata to compare)")
    assert installed == dsrewrite.__version__


def _run_cli(args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m dsrewrite ARGS`` in a fresh interpreter; stderr's last line lists heavy modules imported."""
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['dsrewrite', *{args!r}]\n"
        "try:\n"
        "    runpy.run_module('dsrewrite', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "else:\n"
        "    code = 0\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', ','.join(heavy), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def _heavy(r: subprocess.CompletedProcess) -> list[str]:
    line = [l for l in r.stderr.splitlines() if l.startswith("HEAVY")][-1]
    return [m for m in line[len("HEAVY"):].strip().split(",") if m]


@pytest.mark.parametrize("args", [["--help"], ["heal", "--help"], ["--version"], ["recipes", "--help"]])
def test_help_and_version_do_not_import_torch(args: list[str]) -> None:
    r = _run_cli(args)
    assert r.returncode == 0, r.stderr
    assert _heavy(r) == [], f"`dsrewrite {' '.join(args)}` imported {_heavy(r)}"


def test_version_comes_from_the_package() -> None:
    r = _run_cli(["--version"])
    assert r.returncode == 0 and r.stdout.strip() == f"dsrewrite, version {dsrewrite.__version__}", r.stdout


def test_command_completion_does_not_import_torch() -> None:
    r = _run_cli([], {"_DSREWRITE_COMPLETE": "bash_complete", "COMP_WORDS": "dsrewrite he", "COMP_CWORD": "1"})
    assert "heal" in r.stdout, r.stdout + r.stderr
    assert _heavy(r) == [], r.stderr


def test_the_checker_sees_torch_when_it_is_imported() -> None:
    """The assertion above can fail: a command that loads a model does import torch."""
    r = _run_cli(["inspect", "demo", "--input-shape", "1,3,32,32"])
    assert "torch" in _heavy(r), r.stderr[-2000:]
