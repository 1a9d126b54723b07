"""A restricted unpickler for ``torch.save(model)`` files: tensors, containers and nn.Module classes only.

``torch.load(weights_only=False)`` runs whatever a pickle asks for (``os.system``,
``builtins.eval``, ...). This module is a drop-in ``pickle_module`` for
``torch.load`` that admits, explicitly:

* **callables** the pickle may *call* (``REDUCE``): torch's tensor/parameter
  rebuild functions, ``torch.Size``, ``torch.device``, ``torch.nn.Parameter``,
  ``collections.OrderedDict``/``Counter``, ``set``, ``frozenset``, ``bytearray``,
  ``complex``, ``slice``, ``_codecs.encode`` (bytes under protocol 2),
  ``functools.partial`` (timm/torchvision store ``partial(nn.LayerNorm, eps=...)``)
  and ``Enum`` classes (a lookup by value, e.g. timm's ``Format``);
* **types** the pickle may only *instantiate without calling* (``NEWOBJ`` +
  ``BUILD``, which is how pickle rebuilds any module): subclasses of
  ``torch.nn.Module`` (except ``torch.fx.GraphModule`` and TorchScript modules,
  whose state is code), namedtuple classes, and ``timm.models._features.FeatureInfo``;
* **values** that are merely stored: torch dtypes, layouts, memory formats,
  qschemes, tensor and storage types, ``nn.Module`` classes used as attributes
  (``act_layer=nn.ReLU``) and public functions of ``torch.nn.functional``.

Everything else (including ``torch.fx`` graph modules, whose pickles ``exec``
code) raises :class:`~dsrewrite.errors.UnsafePickleError` naming the object.
Quantized modules (``torch.ao.nn.quantized``, whose packed state needs their own
``__setstate__``) raise a :class:`~dsrewrite.errors.ModelLoadError` saying to
rewrite the float model before quantizing it.
Modules named by the pickle are imported only if they are already imported or
are not part of the standard library (an installed package's own classes must be
importable to be rebuilt; importing a stdlib module is never needed).

The unpickler is the pure-Python ``pickle._Unpickler`` with its ``REDUCE``,
``NEWOBJ``, ``NEWOBJ_EX``, ``INST`` and ``OBJ`` handlers checked, so a pickle cannot
call an admitted class's constructor either.

Example:
    >>> import io, pickle, torch
    >>> from dsrewrite.io.safe_pickle import restricted_torch_load
    >>> buf = io.BytesIO(); torch.save(torch.nn.Linear(2, 3), buf); _ = buf.seek(0)
    >>> restricted_torch_load(buf).weight.shape
    torch.Size([3, 2])
    >>> evil = io.BytesIO(b"cos\\nsystem\\n(S'echo hi'\\ntR.")
    >>> try:
    ...     load(evil)
    ... except Exception as exc:
    ...     print(type(exc).__name__, "'os.system'" in str(exc))
    UnsafePickleError True
"""

from __future__ import annotations

import _compat_pickle
import collections
import enum
import functools
import importlib
import os
import pickle
import sys
from typing import IO, Any, Callable, Optional, Union

import torch
import torch.fx
import torch.jit
from torch import nn

from ..errors import ModelLoadError, UnsafePickleError

__all__ = [
    "RestrictedUnpickler",
    "Unpickler",
    "load",
    "loads",
    "restricted_torch_load",
    "admitted_callables",
    "admitted_values",
    "TRUST_HINT",
]

TRUST_HINT = (
    "If you trust this file, re-run with --trust-pickle (trust_pickle=True) to load it with "
    "plain torch.load(weights_only=False), or save a state dict and pass --arch."
)

# Explicit plain (non-Module) classes that real model pickles hold as attributes.
_PLAIN_TYPES: tuple[str, ...] = ("timm.models._features.FeatureInfo",)

_REBUILD_FUNCTIONS: tuple[str, ...] = (
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
    "_rebuild_qtensor",
    "_rebuild_sparse_tensor",
    "_rebuild_meta_tensor_no_storage",
    "_rebuild_wrapper_subclass",
    "_rebuild_device_tensor_from_cpu_tensor",
)


# Quantized module packages: their pickled state is packed params restored by custom __setstate__.
_QUANTIZED_PACKAGES: tuple[str, ...] = (
    "torch.ao.nn.quantized.", "torch.nn.quantized.", "torch.ao.nn.intrinsic.quantized.",
    "torch.nn.intrinsic.quantized.",
)

# Modules whose state is code (fx graph modules recompile Python source; TorchScript is
# its own format): never rebuilt from a pickle by dsrewrite.
_CODE_CARRYING_MODULES: tuple[type, ...] = (torch.fx.GraphModule, torch.jit.ScriptModule)


def _rebuild_functions() -> dict[str, Callable[..., Any]]:
    out: dict[str, Callable[..., Any]] = {}
    for name in _REBUILD_FUNCTIONS:
        fn = getattr(torch._utils, name, None)
        if fn is not None:
            out[f"torch._utils.{name}"] = fn
    return out


def _checked_rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """``torch._tensor._rebuild_from_type_v2`` with its ``func`` and ``new_type`` vetted."""
    if func not in _rebuild_functions().values():
        raise UnsafePickleError(
            f"refused to rebuild a tensor with {_describe(func)}: only torch's tensor rebuild "
            f"functions are admitted. {TRUST_HINT}"
        )
    if not (isinstance(new_type, type) and issubclass(new_type, torch.Tensor)):
        raise UnsafePickleError(
            f"refused to rebuild a tensor as {_describe(new_type)}: not a torch.Tensor subclass. "
            f"{TRUST_HINT}"
        )
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


@functools.lru_cache(maxsize=1)
def admitted_callables() -> dict[str, Any]:
    """The objects, by ``module.qualname``, that a pickle may call (``REDUCE``).

    Example:
        >>> "torch._utils._rebuild_tensor_v2" in admitted_callables()
        True
        >>> "builtins.eval" in admitted_callables()
        False
    """
    rc: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "collections.Counter": collections.Counter,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.bytearray": bytearray,
        "builtins.complex": complex,
        "builtins.slice": slice,
        "_codecs.encode": __import__("_codecs").encode,
        "functools.partial": functools.partial,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch.nn.parameter.Parameter": nn.Parameter,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "torch._tensor._rebuild_from_type_v2": _checked_rebuild_from_type_v2,
    }
    rc.update(_rebuild_functions())
    return rc


@functools.lru_cache(maxsize=1)
def admitted_values() -> dict[str, Any]:
    """Objects, by ``module.qualname``, a pickle may reference but never call: dtypes, tensor/storage types.

    Example:
        >>> admitted_values()["torch.float32"]
        torch.float32
    """
    rc: dict[str, Any] = {"torch.Tensor": torch.Tensor}
    for name in dir(torch):
        obj = getattr(torch, name, None)
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)):
            rc[f"torch.{name}"] = obj
    for tt in torch._tensor_classes:
        rc[f"{tt.__module__}.{tt.__name__}"] = tt
    for ts in torch._storage_classes:
        if ts in (torch.storage.TypedStorage, torch.storage.UntypedStorage):
            rc[f"{ts.__module__}.{ts.__name__}"] = ts
        else:
            rc[f"{ts.__module__}.{ts.__name__}"] = torch.serialization.StorageType(ts.__name__)
    return rc


def _describe(obj: Any) -> str:
    mod = getattr(obj, "__module__", None) or type(obj).__module__
    qual = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"'{mod}.{qual}'"


def _is_namedtuple_type(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")


def _may_call(obj: Any) -> bool:
    if isinstance(obj, type) and issubclass(obj, enum.Enum):
        # a concrete enum: calling it is a lookup by value (one with members cannot be extended)
        return len(obj.__members__) > 0
    try:
        return any(obj is c for c in admitted_callables().values())
    except TypeError:
        return False


def _may_instantiate(obj: Any) -> bool:
    if not isinstance(obj, type):
        return False
    if issubclass(obj, _CODE_CARRYING_MODULES):
        return False
    if issubclass(obj, nn.Module) or _is_namedtuple_type(obj):
        return True
    return f"{obj.__module__}.{obj.__qualname__}" in _PLAIN_TYPES


def _import(module: str, full: str) -> Any:
    if module in sys.modules:
        return sys.modules[module]
    top = module.split(".", 1)[0]
    if top in sys.stdlib_module_names:
        raise UnsafePickleError(
            f"refused to unpickle '{full}': the pickle asks for standard-library module "
            f"{module!r}, which no model needs. {TRUST_HINT}"
        )
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelLoadError(
            f"the pickle needs '{full}' but module {module!r} cannot be imported ({exc}). "
            f"Install the package that defines the model, run from the directory that holds it "
            f"or add it to PYTHONPATH; or save a state dict and pass --arch."
        ) from exc


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """``pickle._Unpickler`` that admits only what model files need (see the module docstring).

    Example:
        >>> import io, pickle, collections
        >>> data = pickle.dumps(collections.OrderedDict(a=1), protocol=2)
        >>> RestrictedUnpickler(io.BytesIO(data)).load()
        OrderedDict([('a', 1)])
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - pickle API
        if self.proto < 3 and self.fix_imports:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in admitted_callables():
            return admitted_callables()[full]
        if full in admitted_values():
            return admitted_values()[full]
        parts = name.split(".")
        if not module or any(p.startswith("__") or not p.isidentifier() for p in parts):
            raise UnsafePickleError(f"refused to unpickle '{full}': not a plain qualified name. {TRUST_HINT}")
        obj = _import(module, full)
        try:
            for p in parts:
                obj = getattr(obj, p)
        except AttributeError:
            where = (
                "it was defined in the script that saved the model (__main__); make the class "
                "importable from a module, or save a state dict and pass --arch"
                if module == "__main__"
                else f"module {module!r} has no {name!r} (a different version of the package?)"
            )
            raise ModelLoadError(f"the pickle needs '{full}' but {where}.") from None
        if isinstance(obj, type) and obj.__module__.startswith(_QUANTIZED_PACKAGES):
            raise ModelLoadError(
                f"the pickle holds '{full}', a quantized module: the restricted loader does not rebuild "
                "quantized modules (their packed state is restored by their own code), and dsrewrite cannot "
                "factorise quantized convs anyway. Rewrite the float model before quantizing it. If only "
                "non-conv layers are quantized (e.g. dynamically quantized Linear) and you trust the file, "
                "re-run with --trust-pickle."
            )
        if _may_call(obj) or _may_instantiate(obj):
            return obj
        if module == "torch.nn.functional" and callable(obj) and not name.startswith("_"):
            return obj
        if isinstance(obj, type) and issubclass(obj, _CODE_CARRYING_MODULES):
            raise UnsafePickleError(
                f"refused to unpickle '{full}': fx GraphModules and TorchScript modules carry code that "
                f"loading would run. Save the original eager model instead. {TRUST_HINT}"
            )
        kind = "class" if isinstance(obj, type) else ("function" if callable(obj) else "object")
        raise UnsafePickleError(
            f"refused to unpickle '{full}' (a {kind}): the restricted loader admits only tensors, "
            f"plain containers and torch.nn.Module classes. {TRUST_HINT}"
        )

    def _check_call(self, func: Any) -> None:
        if not _may_call(func):
            raise UnsafePickleError(
                f"refused to call {_describe(func)} while unpickling: model pickles written by "
                f"torch.save only call tensor rebuild functions and container types. {TRUST_HINT}"
            )

    def _check_new(self, cls: Any) -> None:
        if not (_may_instantiate(cls) or (isinstance(cls, type) and _may_call(cls))):
            raise UnsafePickleError(f"refused to instantiate {_describe(cls)} while unpickling. {TRUST_HINT}")

    def _load_reduce(self) -> None:
        func, args = self.stack[-2], self.stack[-1]
        self._check_call(func)
        if isinstance(func, type) and issubclass(func, enum.Enum) and len(args) != 1:
            raise UnsafePickleError(f"refused to call enum {_describe(func)} with {len(args)} arguments. {TRUST_HINT}")
        pickle._Unpickler.load_reduce(self)  # type: ignore[attr-defined]

    def _load_newobj(self) -> None:
        self._check_new(self.stack[-2])
        pickle._Unpickler.load_newobj(self)  # type: ignore[attr-defined]

    def _load_newobj_ex(self) -> None:
        self._check_new(self.stack[-3])
        pickle._Unpickler.load_newobj_ex(self)  # type: ignore[attr-defined]

    def _instantiate(self, klass: Any, args: Any) -> None:
        self._check_call(klass)
        pickle._Unpickler._instantiate(self, klass, args)  # type: ignore[attr-defined]

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex


#: ``torch.load`` looks up ``pickle_module.Unpickler``.
Unpickler = RestrictedUnpickler


def load(file: IO[bytes], **kwargs: Any) -> Any:
    """``pickle.load`` with :class:`RestrictedUnpickler` (``torch.load`` calls it for legacy files).

    Example:
        >>> import io, pickle
        >>> load(io.BytesIO(pickle.dumps({"a": [1, 2]})))
        {'a': [1, 2]}
    """
    return RestrictedUnpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    """``pickle.loads`` with :class:`RestrictedUnpickler`.

    Example:
        >>> loads(pickle.dumps((1, "a")))
        (1, 'a')
    """
    import io

    return load(io.BytesIO(data), **kwargs)


def restricted_torch_load(
    f: Union[str, os.PathLike, IO[bytes]],
    *,
    map_location: Any = "cpu",
    source: Optional[str] = None,
) -> Any:
    """``torch.load(f, weights_only=False)`` through :class:`RestrictedUnpickler`.

    :class:`~dsrewrite.errors.UnsafePickleError` and :class:`~dsrewrite.errors.ModelLoadError`
    raised inside are prefixed with ``source`` (default: the path).

    Example:
        >>> import io, torch
        >>> buf = io.BytesIO(); torch.save({"w": torch.ones(2)}, buf); _ = buf.seek(0)
        >>> restricted_torch_load(buf)["w"]
        tensor([1., 1.])
    """
    if source is None:
        source = os.fspath(f) if isinstance(f, (str, os.PathLike)) else "<stream>"
    try:
        return torch.load(f, map_location=map_location, pickle_module=sys.modules[__name__], weights_only=False)
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{source}: {exc}") from None
    except ModelLoadError as exc:
        raise ModelLoadError(f"{source}: {exc}") from exc.__cause__
