# SPDX-License-Identifier: Apache-2.0
"""Load a ``torch.save`` file without running code from it: torch's weights-only unpickler, per-file allowlist.

``torch.load(weights_only=False)`` runs whatever a pickle asks for. dsrewrite never
does that unless the user passes ``trust_pickle=True`` (CLI ``--trust-pickle``).
Instead :func:`safe_torch_load`:

1. reads the file's opcodes without executing them (:mod:`~dsrewrite.io.pickle_scan`):
   every global it names, which it calls (``REDUCE``) and which it only instantiates;
2. decides each global by the admission policy of :mod:`~dsrewrite.io.allowlist`
   (module classes, enums, namedtuples, a reviewed list of plain types and functions)
   and refuses a file that *calls* a module class or a function while loading
   (``torch.save(model)`` only instantiates them);
3. loads with ``torch.load(weights_only=True)`` inside
   ``torch.serialization.safe_globals(...)`` holding exactly those objects;
4. audits the result (:func:`audit_loaded`), every object reachable from it (dict keys and
   tensor attributes included) *before* anything reads it: no instance attribute may hold a
   callable under a dunder or protocol name (``__deepcopy__``, ``keys``, ...) or one that
   shadows its class's own method or attribute (a ``state_dict`` the loader would call);
   hooks may only be torch's weight/spectral-norm hooks; ``functools.partial`` may only wrap
   admitted classes and reviewed functions, bound to plain numbers, flags and names (no
   paths, URLs or weight arguments).

The scan also refuses a mapping built from an object (``OrderedDict(obj)`` calls ``obj.keys``),
state set on an enum member (shared by the whole process), and reads every pickle torch will
read (all ``.pkl`` records of a zip, every pickle of a legacy file).

``torch.compile``'d model objects (``OptimizedModule``) are unwrapped while loading:
the compiler context they pickle (dynamo callbacks, ``getattr`` calls) is replaced by
inert stand-ins and dropped, and the original module is returned. Diffusers'
``FrozenDict`` is rebuilt through an ``OrderedDict`` (torch's unpickler fills only
exact dict types).

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> p = Path(tempfile.mkdtemp()) / "m.pt"; torch.save(torch.nn.Sequential(torch.nn.Linear(2, 3)), p)
    >>> safe_torch_load(p)[0].weight.shape
    torch.Size([3, 2])
"""

from __future__ import annotations

import collections
import functools
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from ..errors import ModelLoadError, UnsafePickleError
from .allowlist import TRUST_HINT, Admitted, admit, is_reviewed_function
from .pickle_scan import NotTorchFile, file_pickles, merge_scans, scan_pickle

__all__ = ["safe_torch_load", "audit_loaded", "unpickler_reason", "TRUST_HINT"]

_COMPILED = "torch._dynamo.eval_frame.OptimizedModule"
#: torch's own allowed callables that a torch.save pickle only ever calls with no arguments.
_EMPTY_CALLS = frozenset({"collections.OrderedDict"})
_COMPILE_CONTEXT_EXTRA = ("torch._TorchCompileInductorWrapper", "contextlib.nullcontext", "builtins.getattr")
_HOOK_TYPES = (
    "torch.nn.utils.weight_norm.WeightNorm",
    "torch.nn.utils.spectral_norm.SpectralNorm",
    "torch.nn.utils.spectral_norm.SpectralNormStateDictHook",
    "torch.nn.utils.spectral_norm.SpectralNormLoadStateDictPreHook",
)


class _Inert:
    """Stands in for the pickled torch.compile context: accepts any construction, holds nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Inert":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _unwrap_compiled(orig_mod: Any = None, *rest: Any) -> Any:
    if not isinstance(orig_mod, nn.Module):
        raise pickle.UnpicklingError("a torch.compile wrapper without a module inside")
    return orig_mod


class _MappingRecorder:
    """Builds reviewed OrderedDict subclasses as plain OrderedDicts while loading, rebuilds them after."""

    def __init__(self) -> None:
        self.made: dict[int, tuple[collections.OrderedDict, type]] = {}

    def stand_in(self, cls: type) -> Any:
        def make(*args: Any) -> collections.OrderedDict:
            if args:  # also refused by the scan; never build a mapping from an object from the file
                raise pickle.UnpicklingError(f"{cls.__qualname__} called with arguments")
            od: collections.OrderedDict = collections.OrderedDict()
            self.made[id(od)] = (od, cls)
            return od

        return make

    def rebuild(self, od: collections.OrderedDict, cls: type) -> Any:
        """``cls`` with ``od``'s items and attributes, read through ``dict``'s own methods only (after the
        audit: nothing the file put on ``od`` is looked up)."""
        new = cls.__new__(cls)
        for k, v in dict.items(od):
            collections.OrderedDict.__setitem__(new, k, v)
        object.__setattr__(new, "__dict__", dict(object.__getattribute__(od, "__dict__")))
        return new


def _describe(obj: Any) -> str:
    if isinstance(obj, functools.partial):
        return f"functools.partial({_describe(obj.func)}, ...)"
    mod = getattr(obj, "__module__", None) or type(obj).__module__
    qual = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"'{mod}.{qual}'"


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)
#: Names Python and libraries look up on an *instance* (not its class): a callable stored under one would be
#: called by ``dict(obj)``, ``copy.deepcopy``, file-like readers, ...
_PROTOCOL_NAMES = frozenset({"keys", "items", "values", "get", "read", "readline", "readinto", "write", "seek",
                             "tell", "close", "fileno"})
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _plain_arg(v: Any) -> bool:
    """What a stored ``functools.partial`` may bind: numbers, flags, short identifier-like strings, dtypes,
    admitted classes, reviewed functions, and tuples/lists/partials of those (no paths, URLs or objects)."""
    if isinstance(v, (bool, int, float, complex, type(None), torch.dtype)):
        return True
    if isinstance(v, str):
        return bool(_IDENT.fullmatch(v))
    if isinstance(v, type) or is_reviewed_function(v):
        return True
    if isinstance(v, (tuple, list)):
        return len(v) <= 64 and all(_plain_arg(x) for x in v)
    return isinstance(v, functools.partial)  # audited on its own


class _Path:
    """Where an object sits in the loaded graph, built only when a refusal names it."""

    __slots__ = ("parent", "step")

    def __init__(self, parent: Optional["_Path"], step: str) -> None:
        self.parent, self.step = parent, step

    def __str__(self) -> str:
        steps, node = [], self
        while node is not None:
            steps.append(node.step)
            node = node.parent
        return "".join(reversed(steps))


def _audit_partial(obj: functools.partial, path: _Path) -> None:
    f = obj.func
    while isinstance(f, functools.partial):
        f = f.func
    if not (isinstance(f, type) or is_reviewed_function(f)):
        raise UnsafePickleError(f"refused: {path} is {_describe(obj)}, a partial around something that "
                                f"is not an admitted class or reviewed function. {TRUST_HINT}")
    from .arch import WEIGHT_ARGS

    bad_kw = sorted(k for k in obj.keywords if k in WEIGHT_ARGS)
    if bad_kw or not all(_plain_arg(a) for a in (*obj.args, *obj.keywords.values())):
        what = f"keyword {bad_kw[0]!r} (weights to download or read)" if bad_kw else \
            "arguments that are not plain numbers, flags or names (a path, URL or object)"
        raise UnsafePickleError(f"refused: {path} is {_describe(obj)} with {what}; calling it would construct "
                                f"{_describe(f)} with data from the file. {TRUST_HINT}")


def _audit_attrs(obj: Any, state: dict[str, Any], path: _Path) -> None:
    cls = type(obj)
    for k, v in _items(state):
        if not callable(v):
            continue
        if not isinstance(k, str) or k.startswith("__") or k in _PROTOCOL_NAMES or hasattr(cls, k):
            raise UnsafePickleError(
                f"refused: attribute {k!r} of {path} ({_qualname(cls)}) holds {_describe(v)}; a callable stored "
                f"under a method's or protocol's name could make dsrewrite or Python call it. {TRUST_HINT}"
            )


def _walk(root: Any, replace: dict[int, Any]) -> Any:
    """Visit every object reachable through containers, instance ``__dict__``s and tensor attributes
    (iteratively, any depth), swap the ``replace``d ones in place, audit each; return the (replaced) root.

    Raises UnsafePickleError on the first audit failure, naming the attribute path.
    """
    root = replace.get(id(root), root)
    seen: set[int] = set()
    todo: list[tuple[Any, _Path]] = [(root, _Path(None, "<file>"))]
    while todo:
        obj, path = todo.pop()
        if isinstance(obj, _LEAVES) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, _Inert):
            raise UnsafePickleError(f"refused: {path} holds part of a torch.compile context outside the "
                                    f"compiled module. {TRUST_HINT}")
        if isinstance(obj, functools.partial):
            _audit_partial(obj, path)
            todo.extend((a, _Path(path, f".args[{i}]")) for i, a in enumerate(obj.args))
            todo.extend((a, _Path(path, f".keywords[{k!r}]")) for k, a in obj.keywords.items())
            continue
        if isinstance(obj, dict):
            for k in list(dict.keys(obj)):
                v = dict.__getitem__(obj, k)
                if id(v) in replace:
                    dict.__setitem__(obj, k, replace[id(v)])
                    v = replace[id(v)]
                todo.append((k, _Path(path, f"<key {k!r}>")))
                todo.append((v, _Path(path, f"[{k!r}]")))
        elif isinstance(obj, list):
            list.__setitem__(obj, slice(None), [replace.get(id(v), v) for v in obj])
            todo.extend((v, _Path(path, f"[{i}]")) for i, v in enumerate(obj))
        elif isinstance(obj, (tuple, set, frozenset)):
            todo.extend((v, _Path(path, f"[{i}]")) for i, v in enumerate(obj))
        if isinstance(obj, type):
            continue
        try:
            state = object.__getattribute__(obj, "__dict__")
        except (AttributeError, TypeError):
            continue
        if not isinstance(state, dict):
            continue
        if isinstance(obj, nn.Module):
            _audit_module(obj, state, path)
        _audit_attrs(obj, state, path)
        for k in list(state):
            if id(state[k]) in replace:
                state[k] = replace[id(state[k])]
            todo.append((state[k], _Path(path, f".{k}")))
    return root


def _items(d: Any) -> list[tuple[Any, Any]]:
    """A dict's items through ``dict`` itself (never a method the file could have put on the instance)."""
    return list(dict.items(d)) if isinstance(d, dict) else []


def _audit_module(m: nn.Module, state: dict[str, Any], path: _Path) -> None:
    for slot, ok in (("_parameters", (torch.Tensor,)), ("_buffers", (torch.Tensor,)), ("_modules", (nn.Module,))):
        for k, v in _items(state.get(slot)):
            if v is not None and not isinstance(v, ok):
                raise UnsafePickleError(f"refused: {path}.{slot}[{k!r}] holds {_describe(v)}, not a "
                                        f"{ok[0].__name__}. {TRUST_HINT}")
    for k, v in _items(state):
        if isinstance(k, str) and k.startswith("_") and "hooks" in k and isinstance(v, dict):
            for hk, hook in _items(v):
                if isinstance(hook, bool):
                    continue
                if _qualname(type(hook)) not in _HOOK_TYPES:
                    raise UnsafePickleError(
                        f"refused: {path}.{k}[{hk!r}] is {_describe(hook)}; the safe loader keeps only torch's "
                        f"weight-norm and spectral-norm hooks (a hook runs when the model is called). {TRUST_HINT}"
                    )


def audit_loaded(obj: Any) -> Any:
    """Check a loaded object graph (see the module docstring); return it unchanged.

    Raises:
        UnsafePickleError: naming the attribute path, e.g. ``<file>.layer.state_dict``.

    Example:
        >>> m = nn.Linear(2, 2); m.state_dict = functools.partial(print, "hi")
        >>> audit_loaded(m)
        Traceback (most recent call last):
        ...
        dsrewrite.errors.UnsafePickleError: refused: attribute 'state_dict' of <file> (torch.nn.modules.linear.Linear) holds functools.partial('builtins.print', ...); a callable stored under a method's or protocol's name could make dsrewrite or Python call it. If you trust this file, re-run with --trust-pickle (trust_pickle=True) to load it with plain torch.load(weights_only=False), or save a state dict and pass --arch.
    """
    return _walk(obj, {})


def unpickler_reason(text: str) -> str:
    """The one informative line of torch's weights-only error (it wraps it in paragraphs of advice, including
    advice to load the file unsafely, which dsrewrite never repeats).

    Example:
        >>> unpickler_reason("Weights only load failed. ... WeightsUnpickler error: Unsupported global: GLOBAL posix.system")
        'Unsupported global: GLOBAL posix.system'
        >>> unpickler_reason("Weights only load failed. Re-running ...\\n\\nTrying to load GLOBAL os.system.\\n\\nCheck ...")
        'Trying to load GLOBAL os.system'
    """
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = [ln.strip() for ln in text.split(marker, 1)[1].splitlines() if ln.strip()]
        if rest:
            return rest[0].rstrip(".")
    boiler = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)",
              "In PyTorch 2.6")
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    keep = [p for p in paras if not p.startswith(boiler)]
    first = (keep or paras or ["unknown reason"])[0]
    return first.splitlines()[0].rstrip(".")


def safe_torch_load(
    f: Union[str, os.PathLike],
    *,
    map_location: Any = "cpu",
    allow_modules: Iterable[str] = (),
    allow_globals: Iterable[str] = (),
    source: Optional[str] = None,
) -> Any:
    """``torch.load(f, weights_only=True)`` with a per-file allowlist, scanned and audited (module docstring).

    Args:
        f: a file written by ``torch.save`` (zip or legacy format).
        map_location: as for ``torch.load`` (default ``"cpu"``).
        allow_modules: packages the file may import beyond those already imported and the known model
            libraries (CLI ``--allow-module``).
        allow_globals: extra plain types or functions, by ``module.qualname`` (CLI ``--allow-global``).
        source: the name used in messages (default: the path).

    Raises:
        UnsafePickleError: the file names, calls or holds something the loader does not admit.
        ModelLoadError: the file is not a torch pickle, or needs a module that cannot be imported.

    Example:
        >>> import tempfile, argparse
        >>> p = Path(tempfile.mkdtemp()) / "ck.pt"
        >>> torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": {"w": torch.ones(1)}}, p)
        >>> safe_torch_load(p)["args"].lr
        0.1
    """
    path = Path(f)
    source = source or os.fspath(path)
    try:
        pickles, _fmt = file_pickles(path)
        scan = merge_scans([scan_pickle(data) for data in pickles])
    except NotTorchFile as exc:
        raise ModelLoadError(f"{source} is not a torch file ({exc}); expected a file written by torch.save "
                             "(a model or a state dict).") from exc
    except (ValueError, EOFError, OSError) as exc:
        raise ModelLoadError(f"{source} could not be read as a torch file ({type(exc).__name__}: {exc}); "
                             "expected a file written by torch.save. Re-save or re-copy the file.") from exc
    if scan.unsupported:
        raise UnsafePickleError(f"{source}: refused: the pickle uses {scan.unsupported[0]}, which torch.save "
                                f"never writes. {TRUST_HINT}")
    builtin = set(torch._weights_only_unpickler._get_allowed_globals())
    safe: list[Any] = []
    inert: set[str] = set()
    if _COMPILED in scan.globals:
        inert = {n for n in scan.globals
                 if n.startswith("torch._dynamo.") or n in _COMPILE_CONTEXT_EXTRA} - {_COMPILED}
        safe.append((_unwrap_compiled, _COMPILED))
        safe.extend((_Inert, n) for n in sorted(inert))
    needed = sorted(n for n in scan.globals if n not in builtin and n not in inert and n != _COMPILED)
    try:
        admitted: Admitted = admit(needed, allow_modules=allow_modules, allow_globals=allow_globals)
    except ModelLoadError as exc:
        raise type(exc)(f"{source}: {exc}") from exc.__cause__
    role = admitted.roles.get
    refusals: tuple[tuple[frozenset[str], Callable[[str], bool], Callable[[str], str]], ...] = (
        (scan.called, lambda n: role(n) in ("module", "function"),
         lambda n: f"refused to call {'the constructor of module class' if role(n) == 'module' else 'function'} "
                   f"{n!r} while loading: torch.save of a model only rebuilds modules without calling them"),
        (scan.instantiated_with_args, lambda n: role(n) == "module",
         lambda n: f"refused to pass arguments to {n}.__new__ while loading: torch.save of a model rebuilds "
                   "modules with no arguments"),
        (scan.called_with_args, lambda n: n in _EMPTY_CALLS or role(n) == "mapping",
         lambda n: f"refused to call {n!r} with arguments while loading: a pickled mapping is rebuilt empty and "
                   "then filled (building it from an object would call that object's methods)"),
        (scan.built, lambda n: role(n) == "enum",
         lambda n: f"refused to set state on a member of enum {n!r}: enum members are shared by the whole process"),
    )
    for names, refused, why in refusals:
        for name in sorted(names):
            if refused(name):
                raise UnsafePickleError(f"{source}: {why(name)}. {TRUST_HINT}")
    recorder = _MappingRecorder()
    for name, obj in admitted.objects.items():
        safe.append((recorder.stand_in(obj), name) if admitted.roles[name] == "mapping" else (obj, name))
    already = set(map(repr, torch.serialization.get_safe_globals()))
    safe = [g for g in safe if repr(g) not in already]
    try:
        with torch.serialization.safe_globals(safe):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = unpickler_reason(str(exc))
        if "persistent_load of storage" in reason and _fmt == "legacy":
            raise ModelLoadError(
                f"{source} is a whole module saved in torch's legacy format (_use_new_zipfile_serialization=False), "
                "which stores module source code and which torch's weights-only loader cannot read. Re-save it with "
                "a current torch (torch.save(model)), or save its state dict and pass --arch."
            ) from None
        raise UnsafePickleError(f"{source}: refused by torch's weights-only unpickler: {reason}. {TRUST_HINT}") \
            from None
    except MemoryError:
        raise ModelLoadError(f"{source}: ran out of memory while reading the file.") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else "no message"
        raise ModelLoadError(
            f"{source}: the file is a well-formed torch pickle, but rebuilding an object it describes failed "
            f"({type(exc).__name__}: {first}); it may come from other versions of the packages that define the "
            "model."
        ) from exc
    try:
        _walk(obj, {})  # audit everything first: the rebuild below reads the mappings it audited
        replace = {i: recorder.rebuild(od, cls) for i, (od, cls) in recorder.made.items()}
        return _walk(obj, replace) if replace else obj
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{source}: {exc}") from None
