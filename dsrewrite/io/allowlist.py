# SPDX-License-Identifier: Apache-2.0
"""Which globals a model file may name: the admission policy of the safe loader.

``torch.load(weights_only=True)`` admits tensors, containers and torch's own
rebuild functions. A whole pickled model also names its module classes, and real
checkpoints a few plain helper types. :func:`admit` decides, per name the file
holds, whether it may be passed to ``torch.serialization.safe_globals``:

1. The name is split at its last dot into a module and an attribute; the module is
   imported only if it is already imported, belongs to a known model library
   (:data:`KNOWN_LIBRARIES`) or a package the user named (``allow_modules``,
   CLI ``--allow-module``); never a standard-library module except the few that
   define reviewed types (``argparse``, ``functools``).
2. The object is a *plain attribute* of that module (no traversal through other
   modules or classes) and is *defined there* (``__module__``/``__qualname__`` equal
   the file's name), so ``torch.nn.functional.os.system`` and re-exports never resolve.
3. It is then admitted only if it is

   * an ``nn.Module`` subclass (not ``torch.fx.GraphModule`` or TorchScript, whose
     state is code; not a quantized module) — *instantiated* only, never called;
   * an ``Enum`` with members or a ``namedtuple`` class (plain values);
   * one of the reviewed plain types real checkpoints hold (:data:`REVIEWED_TYPES`:
     ``argparse.Namespace``, torchvision's detection helpers, timm's ``FeatureInfo``,
     weight/spectral-norm hooks, ``functools.partial``), or named by the user in
     ``allow_globals`` (CLI ``--allow-global``);
   * one of the reviewed functions models keep as attributes (:data:`REVIEWED_FUNCTIONS`:
     activations such as ``torch.nn.functional.gelu``), by object identity.

Everything else raises :class:`~dsrewrite.errors.UnsafePickleError` naming the global.

Example:
    >>> a = admit(["torch.nn.modules.conv.Conv2d", "argparse.Namespace"])
    >>> sorted(a.roles.values())
    ['data', 'module']
    >>> admit(["torch.serialization.os.system"])
    Traceback (most recent call last):
    ...
    dsrewrite.errors.UnsafePickleError: refused to load global 'torch.serialization.os.system': module 'torch.serialization.os' is not a module that can be imported by that name (a name reached through another module's attribute). If you trust this file, re-run with --trust-pickle (trust_pickle=True) to load it with plain torch.load(weights_only=False), or save a state dict and pass --arch.
"""

from __future__ import annotations

import enum
import importlib
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Iterable, Literal, Mapping

import torch
from torch import nn

from ..errors import ModelLoadError, UnsafePickleError

__all__ = [
    "Admitted",
    "admit",
    "KNOWN_LIBRARIES",
    "REVIEWED_TYPES",
    "REVIEWED_FUNCTIONS",
    "TRUST_HINT",
    "is_reviewed_function",
]

TRUST_HINT = (
    "If you trust this file, re-run with --trust-pickle (trust_pickle=True) to load it with "
    "plain torch.load(weights_only=False), or save a state dict and pass --arch."
)

#: Top-level packages whose modules a file may name (importing them runs only that library's code).
KNOWN_LIBRARIES: tuple[str, ...] = (
    "torch", "torchvision", "torchaudio", "timm", "segmentation_models_pytorch", "monai", "diffusers",
    "transformers", "kornia", "ultralytics", "lightning", "pytorch_lightning", "open_clip", "mmseg",
    "mmdet", "mmcv", "detectron2", "efficientnet_pytorch", "pretrainedmodels", "dsrewrite",
)

#: Plain (non-Module) types that real checkpoints and model pickles hold, by qualified name.
REVIEWED_TYPES: tuple[str, ...] = (
    "argparse.Namespace",  # timm train.py and Lightning checkpoints (timm's own loader allows it)
    "functools.partial",  # norm_layer=partial(nn.LayerNorm, eps=...) in torchvision/timm models
    "torchvision.models.detection._utils.BoxCoder",
    "torchvision.models.detection._utils.BoxLinearCoder",
    "torchvision.models.detection._utils.Matcher",
    "torchvision.models.detection._utils.SSDMatcher",
    "torchvision.models.detection._utils.BalancedPositiveNegativeSampler",
    "timm.models._features.FeatureInfo",
    # diffusers' attention modules hold a stateless processor object whose __call__ is the attention
    "diffusers.models.attention_processor.AttnProcessor",
    "diffusers.models.attention_processor.AttnProcessor2_0",
    "diffusers.models.attention_processor.AttnAddedKVProcessor",
    "diffusers.models.attention_processor.AttnAddedKVProcessor2_0",
    "torch.nn.utils.weight_norm.WeightNorm",
    "torch.nn.utils.spectral_norm.SpectralNorm",
    "torch.nn.utils.spectral_norm.SpectralNormStateDictHook",
    "torch.nn.utils.spectral_norm.SpectralNormLoadStateDictPreHook",
)

#: Mappings rebuilt through an OrderedDict (torch's unpickler fills only exact dict types).
REVIEWED_MAPPINGS: tuple[str, ...] = ("diffusers.configuration_utils.FrozenDict",)

_F = "torch.nn.functional"
#: Functions models keep as attributes (``self.act = F.gelu``): pure tensor functions, by name.
REVIEWED_FUNCTIONS: tuple[str, ...] = tuple(
    f"{_F}.{n}" for n in (
        "relu", "relu6", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid",
        "hardtanh", "leaky_relu", "prelu", "rrelu", "glu", "logsigmoid", "softplus", "softsign",
        "tanhshrink", "softmax", "log_softmax", "sigmoid", "tanh", "normalize", "layer_norm",
        "group_norm", "batch_norm", "instance_norm", "dropout", "interpolate", "avg_pool2d",
        "max_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "pad", "identity",
    )
) + (
    "torch.relu", "torch.sigmoid", "torch.tanh", "torch.cat", "torch.add", "torch.mul", "torch.flatten",
    "torchvision.ops.boxes.box_iou",  # Faster/Mask R-CNN keep it as box_similarity
    "torchvision.models.optical_flow.raft._pass_through_h",
    "timm.layers.activations.swish", "timm.layers.activations.mish", "timm.layers.activations.sigmoid",
    "timm.layers.activations.tanh", "timm.layers.activations.hard_sigmoid",
    "timm.layers.activations.hard_swish", "timm.layers.activations.hard_mish",
    "timm.layers.activations.gelu", "timm.layers.activations.gelu_tanh",
    "timm.layers.activations.quick_gelu",
)

_STDLIB_OK = ("argparse", "functools")
_QUANTIZED_PACKAGES: tuple[str, ...] = (
    "torch.ao.nn.quantized.", "torch.nn.quantized.", "torch.ao.nn.intrinsic.quantized.",
    "torch.nn.intrinsic.quantized.",
)

Role = Literal["module", "data", "mapping", "enum", "function"]


@dataclass(frozen=True)
class Admitted:
    """The admitted globals of one file: ``objects[name]`` and ``roles[name]``.

    Roles: ``module`` (an ``nn.Module`` class: may be instantiated, never called), ``data``
    (a plain reviewed type, enum or namedtuple: may be called), ``mapping`` (rebuilt through an
    OrderedDict), ``function`` (a reviewed function: stored, never called while loading).
    """

    objects: Mapping[str, Any] = field(default_factory=dict)
    roles: Mapping[str, Role] = field(default_factory=dict)


def _resolve_named(qualified: str) -> Any:
    module, _, attr = qualified.rpartition(".")
    mod = sys.modules.get(module)
    return None if mod is None else getattr(mod, attr, None)




def is_reviewed_function(obj: Any) -> bool:
    """Whether ``obj`` is one of :data:`REVIEWED_FUNCTIONS` (identity, modules already imported).

    Example:
        >>> import torch.nn.functional as F, os
        >>> is_reviewed_function(F.gelu), is_reviewed_function(os.system)
        (True, False)
    """
    return any(obj is _resolve_named(q) for q in REVIEWED_FUNCTIONS)


def _module_allowed(module: str, allow_modules: tuple[str, ...]) -> bool:
    top = module.split(".", 1)[0]
    if top in _STDLIB_OK:
        return module == top
    if top in sys.stdlib_module_names or top == "builtins":
        return False
    if module in sys.modules or top in KNOWN_LIBRARIES:
        return True
    return any(module == m or module.startswith(m + ".") for m in allow_modules)


def _import(name: str, module: str, allow_modules: tuple[str, ...]) -> ModuleType:
    if module == "__main__":
        raise ModelLoadError(
            f"the file needs '{name}', which was defined in the script that saved the model (__main__): "
            "make the class importable from a module, or save a state dict and pass --arch."
        )
    if not module or not all(p.isidentifier() for p in module.split(".")):
        raise UnsafePickleError(f"refused to load global {name!r}: {module!r} is not a module name. {TRUST_HINT}")
    if any(p.startswith("__") for p in module.split(".")):
        raise UnsafePickleError(f"refused to load global {name!r}: module {module!r} has a dunder part "
                                f"(__main__ modules run a program when imported). {TRUST_HINT}")
    if not _module_allowed(module, allow_modules):
        top = module.split(".", 1)[0]
        if top in sys.stdlib_module_names or top == "builtins":
            raise UnsafePickleError(
                f"refused to load global {name!r}: it comes from standard-library module {module!r}, which "
                f"no model needs. {TRUST_HINT}"
            )
        raise UnsafePickleError(
            f"refused to load global {name!r}: module {module!r} is not imported and not a known model "
            f"library, and importing it would run its code. If you trust that package, pass --allow-module "
            f"{top} (allow_modules=[{top!r}] in Python). {TRUST_HINT}"
        )
    mod = sys.modules.get(module)
    if isinstance(mod, ModuleType):
        return mod
    parent, _, leaf = module.rpartition(".")
    held = vars(sys.modules[parent]).get(leaf) if parent in sys.modules else None
    if held is not None and not (isinstance(held, ModuleType) and held.__name__ == module):
        raise UnsafePickleError(
            f"refused to load global {name!r}: module {module!r} is not a module that can be imported by "
            f"that name (a name reached through another module's attribute). {TRUST_HINT}"
        )
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ModelLoadError(
            f"the file needs '{name}' but module {module!r} cannot be imported ({exc}). Install the package "
            "that defines the model, run from the directory that holds it or add it to PYTHONPATH; or save a "
            "state dict and pass --arch."
        ) from exc
    except (Exception, SystemExit) as exc:  # a module whose import runs a program or fails
        raise UnsafePickleError(
            f"refused to load global {name!r}: importing module {module!r} raised {type(exc).__name__} "
            f"({str(exc).splitlines()[0] if str(exc) else 'no message'}). {TRUST_HINT}"
        ) from None
    if getattr(mod, "__name__", None) != module:
        raise UnsafePickleError(
            f"refused to load global {name!r}: module {module!r} is not a module that can be imported by "
            f"that name (a name reached through another module's attribute). {TRUST_HINT}"
        )
    return mod


def _own_code(cls: type, methods: tuple[str, ...]) -> str:
    """The first of ``methods`` that ``cls`` inherits from outside torch and ``object`` ('' if none)."""
    for meth in methods:
        for base in cls.__mro__:
            if meth in vars(base):
                if base is not object and not base.__module__.split(".", 1)[0] == "torch":
                    return f"{meth} ({base.__module__}.{base.__qualname__})"
                break
    return ""


def _role(obj: Any, name: str, allow_globals: tuple[str, ...]) -> Role | None:
    if isinstance(obj, type):
        if issubclass(obj, (torch.fx.GraphModule, torch.jit.ScriptModule)):
            raise UnsafePickleError(
                f"refused to load global {name!r}: fx GraphModules and TorchScript modules carry code that "
                f"loading would run. Save the original eager model instead. {TRUST_HINT}"
            )
        if obj.__module__.startswith(_QUANTIZED_PACKAGES):
            raise ModelLoadError(
                f"the file holds '{name}', a quantized module: the safe loader does not rebuild quantized "
                "modules (their packed state is restored by their own code), and dsrewrite cannot factorise "
                "quantized convs anyway. Rewrite the float model before quantizing it. If only non-conv layers "
                "are quantized (e.g. dynamically quantized Linear) and you trust the file, re-run with --trust-pickle."
            )
        if issubclass(obj, nn.Module):
            own = _own_code(obj, ("__setstate__",))
            if own and name not in allow_globals:
                raise UnsafePickleError(
                    f"refused to load global {name!r}: the class defines its own {own}, which loading would "
                    f"run with data from the file. If you trust this class, pass --allow-global {name}. {TRUST_HINT}"
                )
            return "module"
        if issubclass(obj, enum.Enum):
            return "enum" if len(obj.__members__) > 0 else None
        if issubclass(obj, tuple) and hasattr(obj, "_fields"):
            return "data"
        if name in REVIEWED_TYPES or name in allow_globals:
            return "data"
        if name in REVIEWED_MAPPINGS:
            return "mapping"
        return None
    if callable(obj):
        return "function" if (is_reviewed_function(obj) or name in allow_globals) else None
    return None


def admit(
    names: Iterable[str],
    *,
    allow_modules: Iterable[str] = (),
    allow_globals: Iterable[str] = (),
) -> Admitted:
    """Decide for each global ``module.qualname`` the file names (see the module docstring).

    Raises:
        UnsafePickleError: a name that is not admitted (named in the message, with what to do).
        ModelLoadError: a module that cannot be imported, or a class from ``__main__``.

    Example:
        >>> admit(["torch.nn.modules.activation.ReLU"]).roles
        {'torch.nn.modules.activation.ReLU': 'module'}
    """
    mods = tuple(allow_modules)
    extra = tuple(allow_globals)
    objects: dict[str, Any] = {}
    roles: dict[str, Role] = {}
    names = sorted(set(names))
    code = [n for n in names if n.startswith(("torch.fx.graph_module.", "torch.jit."))]
    if code:
        raise UnsafePickleError(
            f"refused to load global {code[0]!r}: fx GraphModules and TorchScript modules carry code that "
            f"loading would run (torch.fx.graph_module). Save the original eager model instead. {TRUST_HINT}"
        )
    for name in names:
        module, _, attr = name.rpartition(".")
        if not attr or not attr.isidentifier() or attr.startswith("__"):
            raise UnsafePickleError(f"refused to load global {name!r}: not a plain qualified name. {TRUST_HINT}")
        mod = _import(name, module, mods)
        obj = vars(mod).get(attr, None)
        if obj is None:
            where = f"module {module!r} has no {attr!r} (a different version of the package?)"
            raise ModelLoadError(f"the file needs '{name}' but {where}.")
        if isinstance(obj, ModuleType):
            raise UnsafePickleError(f"refused to load global {name!r}: it is a module, not a class or function. "
                                    f"{TRUST_HINT}")
        defined_in = getattr(obj, "__module__", None)
        qual = getattr(obj, "__qualname__", None)
        if defined_in != module or qual != attr:
            raise UnsafePickleError(
                f"refused to load global {name!r}: it is {defined_in}.{qual}, not an object defined in "
                f"{module!r} under that name. {TRUST_HINT}"
            )
        role = _role(obj, name, extra)
        if role is None:
            kind = "class" if isinstance(obj, type) else ("function" if callable(obj) else "object")
            raise UnsafePickleError(
                f"refused to load global {name!r} (a {kind}): the safe loader admits tensors, containers, "
                "torch.nn.Module classes and a short reviewed list of plain types and functions. If you trust "
                f"this one, pass --allow-global {name}. {TRUST_HINT}"
            )
        objects[name] = obj
        roles[name] = role
    return Admitted(objects, roles)
