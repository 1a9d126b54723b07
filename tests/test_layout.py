"""The package's layout rules, read from the source with ``ast`` (docs/architecture.md, "Layers").

* no import cycle between package modules (imports inside functions count; a package
  ``__init__`` that re-exports, eagerly or through a lazy ``__getattr__`` table, is an edge);
* the runtime layer imports nothing of dsrewrite but itself and ``dsrewrite.errors``;
* only the top (``dsrewrite``, ``__main__``, ``cli``, ``api``) imports ``dsrewrite.api`` or ``dsrewrite.cli``;
* no module over ~500 lines;
* ``import dsrewrite`` stays light.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dsrewrite"

#: Cycles allowed for now (none: the list may only shrink; an entry needs a reason and a plan to remove it).
ALLOWED_CYCLES: set[frozenset[str]] = set()

#: Modules allowed over the size limit for now (none).
ALLOWED_LONG: dict[str, str] = {}

MAX_LINES = 500
TOP = {"dsrewrite", "dsrewrite.__main__", "dsrewrite.cli", "dsrewrite.api"}  # dsrewrite.cli's submodules too


# ----------------------------------------------------------------------------- the checker
def module_names(package_dir: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file of the package at ``package_dir``."""
    base = package_dir.parent
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}``: every import statement, wherever it is."""
    modules = module_names(package_dir)
    top = package_dir.name
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[: len(parts) - (node.level - 1)])
                    mod = f"{base}.{node.module}" if node.module else base
                else:
                    mod = node.module or ""
                for alias in node.names:  # `from pkg import sub` imports the submodule
                    sub = f"{mod}.{alias.name}"
                    targets.append(sub if sub in modules else mod)
            elif is_pkg and isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in modules:  # a lazy re-export table: {"name": "pkg.module"}
                    targets = [node.value]
            for t in targets:
                if t == top or t.startswith(top + "."):
                    while t not in modules and "." in t:  # `import pkg.mod.attr` -> pkg.mod
                        t = t.rpartition(".")[0]
                    if t in modules and t != name:
                        graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_violations(graph: dict[str, set[str]], top: str = "dsrewrite") -> list[str]:
    """Imports that go the wrong way: runtime upward, or anything below the top into api/cli."""
    bad = []
    runtime = f"{top}.runtime"
    allowed_below = {f"{top}.errors"}
    upper = {f"{top}.api", f"{top}.cli"}
    top_modules = {m.replace("dsrewrite", top, 1) for m in TOP}
    for mod, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if (mod == runtime or mod.startswith(runtime + ".")) and not (
                    dep == runtime or dep.startswith(runtime + ".") or dep in allowed_below):
                bad.append(f"{mod} -> {dep}: the runtime layer imports only torch, the standard library and errors")
            is_upper = dep in upper or dep.startswith(f"{top}.cli.")
            is_top = mod in top_modules or mod.startswith(f"{top}.cli.")
            if is_upper and not is_top:
                bad.append(f"{mod} -> {dep}: only the top (the package, __main__, cli, api) imports api/cli")
    return bad


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


# ----------------------------------------------------------------------------- the checker checks itself
def test_checker_finds_planted_cycles_and_layer_breaks(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": '_LAZY = {"run": "pkg.api"}\n',
        "pkg/api.py": "from .wing import helper\n",
        "pkg/a.py": "def f():\n    from . import b  # inside a function still counts\n",
        "pkg/b.py": "from .a import f\n",
        "pkg/wing/__init__.py": "from .m import helper  # a re-export is an edge\n",
        "pkg/wing/m.py": "def helper():\n    from ..wing import other\n",
        "pkg/wing/up.py": "import pkg.api\n",
        "pkg/runtime/__init__.py": "",
        "pkg/runtime/x.py": "from ..errors import E\nfrom .. import a\n",
        "pkg/errors.py": "class E(Exception): ...\n",
        "pkg/clean.py": "from .errors import E\n",
    })
    graph = import_graph(tmp_path / "pkg")
    assert "pkg.api" in graph["pkg"], "a lazy re-export table is an edge"
    found = set(cycles(graph))
    assert frozenset({"pkg.a", "pkg.b"}) in found, found
    assert frozenset({"pkg.wing", "pkg.wing.m"}) in found, found
    assert not any("pkg.clean" in c or "pkg.errors" in c for c in found)
    bad = layer_violations(graph, top="pkg")
    assert any(b.startswith("pkg.runtime.x -> pkg.a:") for b in bad), bad
    assert not any("pkg.runtime.x -> pkg.errors" in b for b in bad), bad
    assert any(b.startswith("pkg.wing.up -> pkg.api:") for b in bad), bad
    assert not any(b.startswith("pkg -> ") for b in bad), bad


# ----------------------------------------------------------------------------- the rules, on dsrewrite
def test_no_import_cycles() -> None:
    found = [c for c in cycles(import_graph(PACKAGE)) if c not in ALLOWED_CYCLES]
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(sorted(c)) for c in found)


def test_allowed_cycles_still_exist() -> None:
    """An allowlist entry whose cycle is gone must be deleted (so the list only shrinks)."""
    found = set(cycles(import_graph(PACKAGE)))
    stale = [sorted(c) for c in ALLOWED_CYCLES if c not in found]
    assert not stale, f"delete these entries from ALLOWED_CYCLES: {stale}"


def test_layers() -> None:
    bad = layer_violations(import_graph(PACKAGE))
    assert not bad, "\n".join(bad)


def test_no_module_over_the_size_limit() -> None:
    long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES and rel not in ALLOWED_LONG:
            long[rel] = n
    assert not long, f"modules over {MAX_LINES} lines (split them by idea): {long}"


def test_import_dsrewrite_is_light() -> None:
    code = ("import sys, dsrewrite; print(sorted(m for m in sys.modules if m.startswith('dsrewrite'))); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=_env())
    assert out.returncode == 0, out.stderr
    loaded, torch_loaded = out.stdout.splitlines()
    assert loaded == "['dsrewrite', 'dsrewrite.errors']", loaded
    assert torch_loaded == "False"


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ----------------------------------------------------------------------------- the public face
#: The documented workflow (README, docs/architecture.md "Key interfaces"), all importable from ``dsrewrite``.
DOCUMENTED = {
    "rewrite": "dsrewrite.api",
    "rewrite_and_report": "dsrewrite.api",
    "rewrite_with_plan": "dsrewrite.api",
    "RewriteResult": "dsrewrite.api",
    "plan": "dsrewrite.planning.planner",
    "apply_plan": "dsrewrite.planning.apply",
    "capture": "dsrewrite.planning.capture",
    "load_recipe": "dsrewrite.recipe",
    "builtin_recipes": "dsrewrite.recipe",
    "calibrate": "dsrewrite.refit.calibrate",
    "heal": "dsrewrite.refit.heal",
    "prepare_for_deployment": "dsrewrite.deploy.prepare",
    "export_onnx": "dsrewrite.deploy.onnx",
    "fold_batchnorm": "dsrewrite.deploy.bn",
    "hoist_pointwise": "dsrewrite.deploy.hoist",
    "load_model": "dsrewrite.io.load",
    "save_rewrite": "dsrewrite.io.save",
    "load_rewrite": "dsrewrite.io.save",
    "build_report": "dsrewrite.report",
    "Plan": "dsrewrite.planning.types",
    "PlanEntry": "dsrewrite.planning.types",
    "LayerConfig": "dsrewrite.planning.types",
    "DepthwiseSeparableConv2d": "dsrewrite.kinds.separable",
    "example_input": "dsrewrite.runtime.preflight",
}
ERRORS = ["DsRewriteError", "UsageError", "RecipeError", "ModelLoadError", "UnsafePickleError", "OutputError",
          "InputShapeError", "UnsupportedModelError", "UnsupportedConvError", "CaptureError", "PlanError",
          "RewriteError", "CalibrationError"]


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_documented_name_is_importable_from_dsrewrite(name: str) -> None:
    import importlib
    import inspect

    import dsrewrite

    real = getattr(importlib.import_module(DOCUMENTED[name]), name)
    got = getattr(dsrewrite, name)
    assert name in dsrewrite.__all__
    if got is not real:  # dsrewrite.calibrate / heal / capture once their old module path was imported
        assert callable(got) and got.__wrapped__ is real, f"dsrewrite.{name} is {got!r}, not {real!r}"
        assert inspect.signature(got) == inspect.signature(real)


@pytest.mark.parametrize("name", ERRORS)
def test_error_classes_are_importable_from_dsrewrite(name: str) -> None:
    import dsrewrite
    import dsrewrite.errors

    assert getattr(dsrewrite, name) is getattr(dsrewrite.errors, name)
    assert name in dsrewrite.__all__


def test_old_module_paths_still_work_and_say_where_they_moved() -> None:
    import importlib

    moved = {
        "macs": "measure.macs", "fidelity": "measure.fidelity", "latency": "measure.latency",
        "calibrate": "refit.calibrate", "lstsq": "refit.lstsq", "relu_fit": "refit.relu_fit",
        "activation": "refit.activation", "heal": "refit.heal", "calib_data": "refit.calib_data",
        "batches": "refit.batches", "hoist": "deploy.hoist", "capture": "planning.capture",
        "planner": "planning.planner", "apply": "planning.apply", "plan_types": "planning.types",
    }
    for old, new in moved.items():
        shim = importlib.import_module(f"dsrewrite.{old}")
        assert f"dsrewrite.{new}" in (shim.__doc__ or ""), old
        target = importlib.import_module(f"dsrewrite.{new}")
        for name in shim.__all__:
            assert hasattr(shim, name), (old, name)
            if hasattr(target, name):
                assert getattr(shim, name) is getattr(target, name), (old, name)
    from dsrewrite.measure import time_orders  # dsrewrite.measure was the per-conv timing module
    from dsrewrite.measure.timing import time_orders as real

    assert time_orders is real
    import dsrewrite

    assert dsrewrite.calibrate.calibrate is importlib.import_module("dsrewrite.refit.calibrate").calibrate
    for name, where in DOCUMENTED.items():  # every old module is imported now: the public names still work
        real, got = getattr(importlib.import_module(where), name), getattr(dsrewrite, name)
        assert got is real or getattr(got, "__wrapped__", None) is real, f"dsrewrite.{name} is {got!r}"
