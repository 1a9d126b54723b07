# SPDX-License-Identifier: Apache-2.0
"""Arch spec records: parsing and validating ``--arch`` specs and their arguments (nothing is imported or called).

:mod:`dsrewrite.io.arch` builds models from them.

Example:
    >>> arch_spec("timm:resnet18", {"num_classes": 3})
    ArchSpec(spec='timm:resnet18', args=(('num_classes', 3),))
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

import yaml

from ..errors import ModelLoadError
from ..runtime.yaml_bounded import YamlLimitError, load_bounded

__all__ = [
    "DEMO_MODELS", "ArchSpec", "arch_spec", "parse_arch_args", "ARCH_EXAMPLES", "ARCH_FLAG_EXAMPLES", "WEIGHT_ARGS"]

#: The model names every command accepts for the demos, and what each is (built by :func:`dsrewrite.demo.build_demo`).
DEMO_MODELS: dict[str, str] = {
    "demo": "trained demo U-Net (shapes, 4 classes; dsrewrite.shapes)",
    "demo:resnet18": "demo U-Net (ResNet18 encoder, random weights, seed 0)",
}

ARCH_EXAMPLES = "'timm:resnet18', 'torchvision:resnet18', 'smp:Unet:resnet18' or 'mypkg.models:build_model'"
ARCH_FLAG_EXAMPLES = (
    "--arch timm:resnet18, --arch torchvision:resnet18, --arch smp:Unet:resnet18 or --arch mypkg.models:build_model"
)
_LIBRARIES = ("timm", "torchvision", "smp")

#: Argument names that would fetch or read pretrained weights: only ``None`` or ``False`` is admitted.
WEIGHT_ARGS = frozenset({
    "pretrained", "weights", "weights_backbone", "pretrained_backbone", "encoder_weights", "checkpoint_path",
    "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_path", "pretrained_weights", "weights_path",
})

#: Modules (besides the standard library) never used as factories: debuggers, shells, downloaders.
_REFUSED_MODULES = ("torch.hub", "IPython", "ipdb", "pudb", "debugpy", "pydevd", "pdbpp")

#: The longest ``--arch-arg`` value read (its YAML is also bounded in depth and aliases).
MAX_ARCH_ARG_CHARS = 10_000

_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


@dataclass(frozen=True)
class ArchSpec:
    """A validated arch spec and its arguments (plain data), as given by the user.

    ``library`` is ``"demo"``, ``"timm"``, ``"torchvision"``, ``"smp"`` or
    ``"factory"``. Build it with :func:`build_arch`; make one with :func:`arch_spec`.

    Example:
        >>> a = arch_spec("timm:resnet18", {"num_classes": 7})
        >>> a.library, a.kwargs, str(a)
        ('timm', {'num_classes': 7}, 'timm:resnet18 (num_classes=7)')
    """

    spec: str
    args: tuple[tuple[str, Any], ...] = ()

    @property
    def library(self) -> str:
        if self.spec in DEMO_MODELS:
            return "demo"
        prefix = self.spec.partition(":")[0]
        return prefix if prefix in _LIBRARIES else "factory"

    @property
    def kwargs(self) -> dict[str, Any]:
        """The arguments as a fresh dict (a factory may mutate it without changing the record)."""
        return copy.deepcopy(dict(self.args))

    def __str__(self) -> str:
        if not self.args:
            return self.spec
        return f"{self.spec} ({', '.join(f'{k}={v!r}' for k, v in self.args)})"


# ----------------------------------------------------------------------------- validation (no imports)


def _plain(value: Any, name: str) -> Any:
    """``value`` as JSON-like plain data (tuples become lists), or a ModelLoadError naming ``name``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, name) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, name) for k, v in value.items()}
    raise ModelLoadError(
        f"arch arg {name!r} is a {type(value).__name__}; arch args are plain data (None, booleans, numbers, "
        "strings, lists, dicts): build the model in Python and pass it to rewrite() instead."
    )


def _check_factory_path(spec: str) -> None:
    module_name, _, attr = spec.partition(":")
    parts = module_name.split(".") + attr.split(".")
    for part in parts:
        if not part or not _IDENT.fullmatch(part):
            what = "a private or dunder name" if part.startswith("_") else "not a Python name"
            raise ModelLoadError(
                f"arch {spec!r}: {part!r} is {what}; a factory spec is package.module:function or "
                f"package.module:Class with public names, e.g. {ARCH_EXAMPLES}."
            )
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise ModelLoadError(
            f"arch {spec!r}: {top!r} is a Python standard-library module, not a model factory; name a class "
            "or a function that builds an nn.Module, e.g. mypkg.models:build_model."
        )
    for refused in _REFUSED_MODULES:
        if module_name == refused or module_name.startswith(refused + "."):
            raise ModelLoadError(
                f"arch {spec!r}: {refused!r} is never used as a model factory (it opens a debugger or shell, "
                "or downloads code); name a class or a function that builds an nn.Module."
            )


def arch_spec(spec: Union[str, ArchSpec], arch_args: Optional[Mapping[str, Any]] = None) -> ArchSpec:
    """Validate a spec and its arguments into an :class:`ArchSpec`; imports nothing, builds nothing.

    Raises:
        ModelLoadError: the spec is malformed, names a standard-library, private
            or refused module, or an argument is not plain data or would fetch weights.

    Example:
        >>> arch_spec("sys:exit")
        Traceback (most recent call last):
        ...
        dsrewrite.errors.ModelLoadError: arch 'sys:exit': 'sys' is a Python standard-library module, not a model factory; name a class or a function that builds an nn.Module, e.g. mypkg.models:build_model.
        >>> arch_spec("smp:Unet", {"encoder_weights": "imagenet"})
        Traceback (most recent call last):
        ...
        dsrewrite.errors.ModelLoadError: arch 'smp:Unet': encoder_weights='imagenet' would download or read pretrained weights; dsrewrite builds random weights and never downloads: drop it, and pass your trained checkpoint as MODEL with --arch.
    """
    if isinstance(spec, ArchSpec):  # validated again: a hand-made ArchSpec gets no pass
        if arch_args:
            raise ModelLoadError(f"arch {spec.spec!r}: pass the arguments in the ArchSpec or in arch_args, not both.")
        return arch_spec(spec.spec, dict(spec.args))
    text = str(spec).strip()
    if text not in DEMO_MODELS:
        prefix, sep, rest = text.partition(":")
        if not sep or not prefix or not rest or not re.fullmatch(r"[A-Za-z_][\w.]*", prefix):
            raise ModelLoadError(f"unknown arch spec {text!r}: use 'demo', {ARCH_EXAMPLES}.")
        if prefix not in _LIBRARIES:
            _check_factory_path(text)
    args: list[tuple[str, Any]] = []
    for name, value in (arch_args or {}).items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ModelLoadError(f"arch {text!r}: arch arg name {name!r} is not a Python name (NAME=VALUE).")
        try:
            value = _plain(value, name)
        except ModelLoadError as exc:
            raise ModelLoadError(f"arch {text!r}: {exc}") from None
        if name in WEIGHT_ARGS and value not in (None, False):
            raise ModelLoadError(
                f"arch {text!r}: {name}={value!r} would download or read pretrained weights; dsrewrite builds "
                "random weights and never downloads: drop it, and pass your trained checkpoint as MODEL with --arch."
            )
        args.append((name, value))
    if text in DEMO_MODELS and args:
        raise ModelLoadError(f"arch {text!r} takes no arch args (got {', '.join(n for n, _ in args)}).")
    if text.startswith("smp:") and text.count(":") >= 2 and "encoder_name" in dict(args):
        raise ModelLoadError(
            f"arch {text!r} names the encoder twice (in the spec and as encoder_name={dict(args)['encoder_name']!r}); "
            "keep one."
        )
    return ArchSpec(text, tuple(args))


def parse_arch_args(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``NAME=VALUE`` strings (``--arch-arg``); each VALUE is read as a YAML scalar or flow list/dict.

    ``3`` is an int, ``0.5`` and ``1e-3`` floats, ``true``/``false`` booleans,
    ``null`` (or nothing) None, ``[64, 32]`` a list, ``{classes: 4}`` a dict,
    ``'3'`` the string, anything else the text itself.

    Raises:
        ModelLoadError: an item has no ``=``, an empty or non-identifier name, a
            name given twice, or a value that is not valid YAML.

    Example:
        >>> parse_arch_args(["num_classes=7", "in_chans=1", "drop_rate=0.1", "global_pool=avg"])
        {'num_classes': 7, 'in_chans': 1, 'drop_rate': 0.1, 'global_pool': 'avg'}
        >>> parse_arch_args(["classes3"])
        Traceback (most recent call last):
        ...
        dsrewrite.errors.ModelLoadError: --arch-arg 'classes3' is not NAME=VALUE: write e.g. --arch-arg classes=3.
    """
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = str(item).partition("=")
        name = name.strip()
        if not sep:
            raise ModelLoadError(f"--arch-arg {item!r} is not NAME=VALUE: write e.g. --arch-arg classes=3.")
        if not name.isidentifier():
            raise ModelLoadError(f"--arch-arg {item!r}: {name!r} is not an argument name (NAME=VALUE, e.g. classes=3).")
        if name in out:
            raise ModelLoadError(f"--arch-arg {name} is given twice ({out[name]!r} and {text!r}); keep one.")
        if len(text) > MAX_ARCH_ARG_CHARS:
            raise ModelLoadError(f"--arch-arg {name}: the value is {len(text):,} characters long; the bound is "
                                 f"{MAX_ARCH_ARG_CHARS:,} (arch args are short: numbers, names, small lists).")
        try:
            value = load_bounded(text, max_chars=MAX_ARCH_ARG_CHARS)[0]
        except YamlLimitError as exc:
            raise ModelLoadError(f"--arch-arg {name}: refused: {exc}") from None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ModelLoadError(
                f"--arch-arg {name}={text!r}: not a valid YAML value ({problem}); quote a string, "
                "write a list as [1, 2]."
            ) from None
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(text.strip()):
            value = float(text)  # '1e-3': a float in YAML 1.2; PyYAML (YAML 1.1) would keep the text
        try:
            out[name] = _plain(value, name)
        except ModelLoadError:
            out[name] = text  # e.g. a date: YAML's reading is not plain data, the text is what was typed
    return out


