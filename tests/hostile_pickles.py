"""Hand-made hostile ``torch.save`` files for the safe-loading tests.

Each payload, if it ran, would create a marker file. :func:`write_case` writes a
torch file (zip, or legacy format) whose pickle holds the payload; the pickler
below can write any ``GLOBAL`` name (including dotted traversals such as
``torch.serialization`` + ``os.system`` that the real pickler refuses to write),
``REDUCE``/``NEWOBJ``/``BUILD`` sequences, persistent ids and raw opcodes.
"""

from __future__ import annotations

import collections
import io
import pickle
import types
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn


class Ref:
    """Written as ``GLOBAL module\\nname``, whatever it names."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


class Call:
    """``REDUCE``: ``func(*args)``, then ``BUILD`` with ``state`` if given."""

    def __init__(self, func: Any, args: tuple[Any, ...] = (), state: Any = None) -> None:
        self.func, self.args, self.state = func, args, state


class New:
    """``NEWOBJ``: ``cls.__new__(cls, *args)``, then ``BUILD`` with ``state``."""

    def __init__(self, cls: Any, state: Any = None, args: tuple[Any, ...] = ()) -> None:
        self.cls, self.state, self.args = cls, state, args


class PersId:
    """``BINPERSID`` with this tuple as the id."""

    def __init__(self, pid: tuple[Any, ...]) -> None:
        self.pid = pid


class Raw:
    """These bytes, written as they are."""

    def __init__(self, data: bytes) -> None:
        self.data = data


class HostilePickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _ref(self, obj: Ref) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    def _call(self, obj: Call) -> None:
        self.save(obj.func)
        self.save(tuple(obj.args))
        self.write(pickle.REDUCE)
        if obj.state is not None:
            self.save(obj.state)
            self.write(pickle.BUILD)

    def _new(self, obj: New) -> None:
        self.save(obj.cls)
        self.save(tuple(obj.args))
        self.write(pickle.NEWOBJ)
        if obj.state is not None:
            self.save(obj.state)
            self.write(pickle.BUILD)

    def _persid(self, obj: PersId) -> None:
        self.save(obj.pid)
        self.write(pickle.BINPERSID)

    def _raw(self, obj: Raw) -> None:
        self.write(obj.data)

    dispatch[Ref] = _ref
    dispatch[Call] = _call
    dispatch[New] = _new
    dispatch[PersId] = _persid
    dispatch[Raw] = _raw


HOSTILE_MODULE = types.SimpleNamespace(Pickler=HostilePickler, dump=pickle.dump, __name__="hostile_pickles")


class MarkerModule(nn.Module):
    """A module whose constructor writes a file: calling it while loading is a payload."""

    def __init__(self, marker: str = "", *args: Any) -> None:
        super().__init__()
        if marker:
            Path(marker).write_text("constructed")


class SetstateModule(nn.Module):
    """A module class whose own ``__setstate__`` writes a file (BUILD would run it)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        Path(state.get("marker", "/nonexistent/x")).write_text("setstate")
        super().__setstate__(state)


def linear_state(**extra: Any) -> dict[str, Any]:
    """The ``__dict__`` of a real ``nn.Linear(2, 3)`` plus ``extra`` entries (to be BUILT into a module)."""
    torch.manual_seed(0)
    state = dict(vars(nn.Linear(2, 3)))
    state.update(extra)
    return state


LINEAR = Ref("torch.nn.modules.linear", "Linear")
PARTIAL = Ref("functools", "partial")


def partial(func: Any, *args: Any) -> Call:
    """``functools.partial(func, *args)`` the way pickle writes it (REDUCE then BUILD of its state)."""
    return Call(PARTIAL, (func,), (func, tuple(args), {}, None))


def module_with(**attrs: Any) -> New:
    """An ``nn.Linear`` rebuilt as ``torch.save`` rebuilds modules, with extra instance attributes."""
    return New(LINEAR, linear_state(**attrs))


def cases(marker: Path) -> dict[str, tuple[Any, str, bool]]:
    """name -> (object to pickle, fragment the refusal must name, payload fires on a plain load+use).

    The traversal cases do not fire under Python's own unpickler at protocol 2 (it does not follow dotted
    names); they fired under dsrewrite's earlier hand-written unpickler, which did. That their names reach
    os.system is checked separately (test_traversal_names_resolve_to_os_system).
    """
    cmd = f"touch {marker}"
    system = Ref("posix", "system")
    raw_stack_global = (
        pickle.SHORT_BINUNICODE + bytes([len("posix")]) + b"posix"
        + pickle.SHORT_BINUNICODE + bytes([len("system")]) + b"system" + pickle.STACK_GLOBAL
        + pickle.SHORT_BINUNICODE + bytes([len(cmd)]) + cmd.encode() + pickle.TUPLE1 + pickle.REDUCE
    )
    raw_inst = pickle.MARK + pickle.STRING + repr(cmd).encode() + b"\n" + pickle.INST + b"posix\nsystem\n"
    return {
        # the reported exploit: a dotted traversal resolves to os.system, partial binds it,
        # BUILD stores it as the module's state_dict, the loader calls it
        "traversal_state_dict": (module_with(state_dict=partial(Ref("torch.serialization", "os.system"), cmd)),
                                 "torch.serialization.os.system", False),
        "traversal_module_path": (module_with(state_dict=partial(Ref("torch.serialization.os", "system"), cmd)),
                                  "torch.serialization.os.system", False),
        "traversal_functional": (
            module_with(state_dict=partial(Ref("torch.nn.functional", "torch.serialization.os.system"), cmd)),
            "torch.nn.functional.torch.serialization.os.system", False),
        "os_system_reduce": (Call(Ref("os", "system"), (cmd,)), "os.system", True),
        "posix_system_in_dict": ({"state_dict": {"w": torch.ones(1)}, "extra": {"deep": [Call(system, (cmd,))]}},
                                 "posix.system", True),
        "posix_system_in_list": ([torch.ones(1), [Call(system, (cmd,))]], "posix.system", True),
        "builtins_exec": (Call(Ref("builtins", "exec"), (f"open({str(marker)!r}, 'w')",)), "builtins.exec", True),
        "subprocess_popen": (Call(Ref("subprocess", "Popen"), (["touch", str(marker)],)), "subprocess.Popen", True),
        "getattr_traversal": (Call(Ref("builtins", "getattr"), (Ref("torch", "serialization"), "os")),
                              "builtins.getattr", False),
        "unimported_package": (New(Ref("dsr_evil_pkg", "Model"), {}), "dsr_evil_pkg", True),
        "module_constructor_reduce": (Call(Ref("hostile_pickles", "MarkerModule"), (str(marker),)),
                                      "hostile_pickles.MarkerModule", True),
        "module_new_with_args": (New(Ref("hostile_pickles", "MarkerModule"), linear_state(), (str(marker),)),
                                 "MarkerModule.__new__", False),
        "own_setstate": (New(Ref("hostile_pickles", "SetstateModule"), linear_state(marker=str(marker))),
                         "__setstate__", True),
        "shadowed_state_dict_by_module_class": (
            module_with(state_dict=Ref("hostile_pickles", "MarkerModule")), "'state_dict'", False),
        "shadowed_forward_partial": (
            module_with(forward=partial(Ref("hostile_pickles", "MarkerModule"), str(marker))), "'forward'", True),
        "shadowed_named_modules": (
            module_with(named_modules=partial(Ref("torch.nn.functional", "relu"))), "'named_modules'", False),
        "hook_partial_constructor": (
            module_with(_forward_pre_hooks=collections.OrderedDict(
                {0: partial(Ref("hostile_pickles", "MarkerModule"), str(marker))})),
            "_forward_pre_hooks", True),
        "namespace_shadow": ({"args": New(Ref("argparse", "Namespace"),
                                          {"__contains__": partial(Ref("torch.nn.functional", "relu"))}),
                              "state_dict": {"w": torch.ones(1)}}, "'__contains__'", False),
        "persistent_id_not_storage": (PersId(("module", "x", "y")), "persistent_load", False),
        "stack_global": (Raw(raw_stack_global), "STACK_GLOBAL", True),
        "inst_opcode": (Raw(raw_inst), "posix.system", True),
        "compile_context_outside": (
            {"m": Call(Ref("torch._dynamo.eval_frame", "OptimizedModule"), (module_with(),)),
             "x": Call(Ref("builtins", "getattr"), ("abc", "upper"))},
            "torch.compile context", False),
        "main_module_class": (New(Ref("__main__", "Net"), {}), "__main__", False),
        # found in review: a mapping built from an object calls that object's (instance) keys()
        "ordereddict_keys_gadget": (
            {"state_dict": {"w": torch.ones(1)},
             "x": Call(Ref("collections", "OrderedDict"),
                       (module_with(keys=partial(Ref("hostile_pickles", "MarkerModule"), str(marker))),))},
            "collections.OrderedDict", True),
        # copy.deepcopy (apply copies the model) looks __deepcopy__ up on the instance
        "deepcopy_on_module": (module_with(__deepcopy__=partial(Ref("hostile_pickles", "MarkerModule"), str(marker))),
                               "'__deepcopy__'", False),
        "deepcopy_on_parameter": (
            Call(Ref("torch._utils", "_rebuild_parameter_with_state"),
                 (torch.ones(2), True, collections.OrderedDict(),
                  {"__deepcopy__": partial(Ref("hostile_pickles", "MarkerModule"), str(marker))})),
            "'__deepcopy__'", False),
        # state set on an enum member changes it for the whole process
        "enum_member_state": ({"junk": [Call(Ref("torchvision.transforms.functional", "InterpolationMode"),
                                             ("bilinear",), {"_value_": "nearest"})]}, "enum", False),
        # a stored partial that a forward would call, bound to a URL or to pretrained weights
        "partial_with_url": (module_with(act=partial(LINEAR, "hf-hub:attacker-org/beacon")), "plain numbers", False),
        "partial_with_pretrained": (module_with(act=Call(PARTIAL, (LINEAR,), (LINEAR, (3, 4), {"pretrained": True},
                                                                              None))), "'pretrained'", False),
        # importing a __main__ module runs a program
        "dunder_main_module": (Ref("torch.utils.model_dump.__main__", "main"), "dunder part", False),
        "graph_module": (Call(Ref("torch.fx.graph_module", "reduce_graph_module"), ({}, "import os")),
                         "torch.fx.graph_module", False),
    }


def write_case(obj: Any, path: Path, *, legacy: bool = False) -> Path:
    """``torch.save`` ``obj`` with the hostile pickler (zip format unless ``legacy``)."""
    if legacy:
        torch.save(obj, path, pickle_module=HOSTILE_MODULE, _use_new_zipfile_serialization=False)
    else:
        torch.save(obj, path, pickle_module=HOSTILE_MODULE)
    return path


def write_evil_package(root: Path, marker: Path) -> None:
    """A package whose import writes ``marker`` and that defines a Module ``Model``."""
    pkg = root / "dsr_evil_pkg"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "import torch\n"
        "class Model(torch.nn.Module):\n"
        "    pass\n"
    )


def plain_load_and_use(path: Path) -> Optional[Any]:
    """What an unprotected tool does: ``torch.load(weights_only=False)``, then call ``state_dict``/the model."""
    try:
        obj = torch.load(path, weights_only=False)
    except Exception:
        return None
    for m in ([obj] if isinstance(obj, nn.Module) else []):
        for call in (lambda: m.state_dict(), lambda: m(torch.ones(1, 2)), lambda: list(m.named_modules())):
            try:
                call()
            except Exception:
                pass
    return obj


CaseFn = Callable[[Path], Any]
