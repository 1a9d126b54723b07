# SPDX-License-Identifier: Apache-2.0
"""Read, without running anything, which globals a ``torch.save`` pickle names and how it uses them.

The loader (:mod:`dsrewrite.io.safe_load`) hands the actual unpickling to
``torch.load(weights_only=True)``; this module only *reads* the pickle's opcodes
(:func:`pickletools.genops`) to learn, before any object is built:

* every global the file names (``GLOBAL``; ``STACK_GLOBAL`` is recorded as
  unsupported, torch's weights-only unpickler refuses it too);
* which of them the file *calls* (``REDUCE``: ``func(*args)``) and which it only
  *instantiates* (``NEWOBJ``: ``cls.__new__(cls)``, the way pickle rebuilds an
  ``nn.Module`` without running its ``__init__``).

torch's unpickler cannot tell the two apart for an allowlisted class, so the
loader uses this record to refuse a file that calls a module class's constructor
(``REDUCE`` on an ``nn.Module`` subclass: ``torch.save(model)`` never writes
that). The scan follows globals through the memo (``PUT``/``GET``) and ``DUP``;
every other opcode's stack effect is taken from :mod:`pickletools`' opcode table.

Example:
    >>> import pickle, collections
    >>> s = scan_pickle(pickle.dumps(collections.OrderedDict(a=1), protocol=2))
    >>> sorted(s.globals), sorted(s.called)
    (['collections.OrderedDict'], ['collections.OrderedDict'])
"""

from __future__ import annotations

import io
import pickle
import pickletools
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

__all__ = ["PickleScan", "scan_pickle", "merge_scans", "file_pickles", "NotTorchFile"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER


class NotTorchFile(ValueError):
    """The bytes are a pickle, but not one written by ``torch.save``."""


@dataclass(frozen=True)
class PickleScan:
    """What one pickle names: ``globals`` (``module.qualname``), those it ``called`` (REDUCE) and
    ``instantiated`` (NEWOBJ; ``instantiated_with_args``: those given ``__new__`` arguments);
    ``called_with_args`` those called with a non-empty argument tuple; ``built`` those whose
    result a ``BUILD`` then fills (state set on the object); ``unsupported`` lists opcodes that
    name globals dynamically."""

    globals: frozenset[str]
    called: frozenset[str]
    instantiated: frozenset[str]
    unsupported: tuple[str, ...] = ()
    instantiated_with_args: frozenset[str] = frozenset()
    called_with_args: frozenset[str] = frozenset()
    built: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Global:
    name: str


@dataclass(frozen=True, eq=False)
class _Made:
    """The result of calling or instantiating the global ``name``."""

    name: str


_OTHER = object()
_EMPTY = object()  # an empty tuple: NEWOBJ's arguments when pickle rebuilds a plain object


def _normalise(module: str, name: str) -> str:
    """The ``module.name`` key torch's weights-only unpickler looks up (Python 2 names mapped)."""
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def scan_pickle(data: Union[bytes, io.BufferedIOBase]) -> PickleScan:
    """Scan one pickle (bytes or a stream positioned at it, read up to its ``STOP``).

    Raises ``ValueError`` if the bytes are not a well-formed pickle.

    Example:
        >>> s = scan_pickle(b"cos\\nsystem\\n(S'echo hi'\\ntR.")
        >>> sorted(s.called)
        ['os.system']
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    stack: list[Any] = []
    metastack: list[list[Any]] = []
    memo: dict[Any, Any] = {}
    names: set[str] = set()
    called: set[str] = set()
    instantiated: set[str] = set()
    unsupported: list[str] = []
    with_args: set[str] = set()
    called_args: set[str] = set()
    built: set[str] = set()
    for op, arg, _pos in pickletools.genops(stream):
        name = op.name
        if name == "GLOBAL" or name == "INST":
            module, _, attr = str(arg).partition(" ")
            g = _Global(_normalise(module, attr))
            names.add(g.name)
            if name == "INST":  # INST: MARK args... INST module name -> calls the class
                called.add(g.name)
                stack = metastack.pop() if metastack else []
                stack.append(_OTHER)
            else:
                stack.append(g)
            continue
        if name == "STACK_GLOBAL":
            unsupported.append(name)
            stack[-2:] = [_OTHER]
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1] if stack else _OTHER
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else _OTHER
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, _OTHER))
            continue
        if name == "DUP":
            stack.append(stack[-1] if stack else _OTHER)
            continue
        if name == "EMPTY_TUPLE":
            stack.append(_EMPTY)
            continue
        if name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):
            n_args = 2 if name == "NEWOBJ_EX" else 1
            args = stack[len(stack) - n_args:]
            del stack[len(stack) - n_args:]
            func = stack.pop() if stack else _OTHER
            if isinstance(func, _Global):
                (instantiated if name.startswith("NEWOBJ") else called).add(func.name)
                if args[:1] != [_EMPTY]:
                    (with_args if name.startswith("NEWOBJ") else called_args).add(func.name)
                stack.append(_Made(func.name))
            else:
                stack.append(_OTHER)
            continue
        if name == "OBJ":  # MARK cls args... OBJ -> calls cls
            items = stack
            stack = metastack.pop() if metastack else []
            if items and isinstance(items[0], _Global):
                called.add(items[0].name)
            stack.append(_OTHER)
            continue
        if name == "BUILD":
            if stack:
                stack.pop()  # the state; the instance stays on the stack
            if stack and isinstance(stack[-1], _Made):
                built.add(stack[-1].name)
            continue
        if name == "MARK":
            metastack.append(stack)
            stack = []
            continue
        if name == "POP_MARK":
            stack = metastack.pop() if metastack else []
            continue
        before, after = op.stack_before, op.stack_after
        if pickletools.markobject in before:
            below = before.index(pickletools.markobject)
            stack = metastack.pop() if metastack else []
            del stack[len(stack) - below:]
        else:
            del stack[len(stack) - len(before):]
        stack.extend(_OTHER for _ in after)
    return PickleScan(frozenset(names), frozenset(called), frozenset(instantiated), tuple(unsupported),
                      frozenset(with_args), frozenset(called_args), frozenset(built))


def merge_scans(scans: "list[PickleScan]") -> PickleScan:
    """One record for several pickles of the same file (every field the union).

    Example:
        >>> a, b = scan_pickle(pickle.dumps(set(), protocol=2)), scan_pickle(pickle.dumps(len, protocol=2))
        >>> sorted(merge_scans([a, b]).globals)
        ['builtins.len', 'builtins.set']
    """
    return PickleScan(*(frozenset().union(*(getattr(s, f) for s in scans)) if f != "unsupported"
                        else tuple(x for s in scans for x in s.unsupported)
                        for f in ("globals", "called", "instantiated", "unsupported", "instantiated_with_args",
                                  "called_with_args", "built")))


def file_pickles(path: Union[str, Path]) -> tuple[list[bytes], str]:
    """Every pickle torch reads from a ``torch.save`` file, and the format (``"zip"`` or ``"legacy"``).

    Zip files: every ``.pkl`` record of the archive (whatever the case of its name: the scan must
    see whatever torch may read), refusing an archive with more than one ``data.pkl``. Legacy
    (``_use_new_zipfile_serialization=False``) files: the sequence torch unpickles (torch's magic
    number, checked; protocol; system info; the object; the storage keys). Raises ``ValueError``
    (:class:`NotTorchFile` for a pickle without torch's header) when the layout is not recognised.

    Example:
        >>> import tempfile, torch
        >>> p = Path(tempfile.mkdtemp()) / "t.pt"; torch.save({"w": torch.ones(1)}, p)
        >>> pickles, fmt = file_pickles(p); fmt, len(pickles) >= 1
        ('zip', True)
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            data = [n for n in names if n.rsplit("/", 1)[-1].lower() == "data.pkl"]
            if len(data) != 1:
                raise ValueError(f"expected one data.pkl in the archive, found {len(data)}")
            return [zf.read(n) for n in names if n.lower().endswith(".pkl")], "zip"
    out: list[bytes] = []
    with open(path, "rb") as f:
        magic = [arg for _op, arg, _pos in pickletools.genops(f)]
        if _LEGACY_MAGIC not in magic:
            raise NotTorchFile("a pickle without torch's header")
        for _ in range(4):
            start = f.tell()
            try:
                for _op in pickletools.genops(f):
                    pass
            except ValueError:
                if not out:
                    raise
                break  # past the storage keys come raw bytes
            end = f.tell()
            f.seek(start)
            out.append(f.read(end - start))
        return out, "legacy"
