# SPDX-License-Identifier: Apache-2.0
"""Architecture specs: build a model with random weights from a spec and its arguments (never downloads).

Spec forms:

* ``demo``: the embedded demo U-Net (takes no arguments);
* ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, **args)``;
* ``torchvision:NAME``: the torchvision builder with ``weights=None`` (and
  ``weights_backbone=None`` where it has one);
* ``smp:ARCH[:ENCODER]``: ``segmentation_models_pytorch.create_model(ARCH,
  encoder_name=ENCODER, encoder_weights=None, **args)``;
* ``package.module:factory``: an ``nn.Module`` subclass, or a function that
  returns an ``nn.Module``, called with ``**args``. The module is imported
  directly, then a plain attribute path (``pkg.mod:Builder.make``) is followed;
  private or dunder parts, standard-library modules (``sys:exit``, ``os:abort``,
  ``builtins:breakpoint``: refused before anything is imported) and debugger or
  hub modules are refused.

Arguments (``--arch-arg NAME=VALUE``, ``arch_args={...}``) are plain data
(``None``, booleans, numbers, strings, lists, dicts). Names and simple types
(``int``, ``float``, ``bool``, ``str``, ``Optional``, sequences) are checked
against the factory's signature before it is called; a ``**kwargs`` factory
(``timm.create_model``) gets them as they are, and a ``TypeError`` naming one is
reported. An argument that would fetch or read pretrained weights
(:data:`WEIGHT_ARGS`, e.g. ``encoder_weights=imagenet``) is refused.

While a factory is imported and called, ``breakpoint()`` is refused whatever
``PYTHONBREAKPOINT`` says, and ``SystemExit``, ``KeyboardInterrupt`` and any other
exception become one :class:`~dsrewrite.errors.ModelLoadError` (CLI exit 2).

Example:
    >>> a = arch_spec("smp:Unet", {"encoder_name": "resnet18", "classes": 3})
    >>> str(a)
    "smp:Unet (encoder_name='resnet18', classes=3)"
    >>> build_arch(a).segmentation_head[0].out_channels
    3
    >>> parse_arch_args(["classes=3", "decoder_channels=[64, 32, 16, 8, 4]", "activation=null"])
    {'classes': 3, 'decoder_channels': [64, 32, 16, 8, 4], 'activation': None}
"""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import pkgutil
import re
import sys
import types
import typing
from typing import Any, Callable, Mapping, Optional, TypeVar, Union

from torch import nn

from ..errors import ModelLoadError, did_you_mean

from .arch_spec import (
    ARCH_EXAMPLES,
    ARCH_FLAG_EXAMPLES,
    WEIGHT_ARGS,
    ArchSpec,
    arch_spec,
    parse_arch_args,
)

_T = TypeVar("_T")

__all__ = [
    "ArchSpec",
    "arch_spec",
    "parse_arch_args",
    "build_arch",
    "ARCH_EXAMPLES",
    "ARCH_FLAG_EXAMPLES",
    "WEIGHT_ARGS",
]

# ----------------------------------------------------------------------------- signatures


def _hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # forward references that do not resolve, C functions: no type checks
        return {}


def _signature(target: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """The keyword parameters, type hints and whether ``**kwargs`` is open, of a class or function.

    A function whose ``**kwargs`` go to the class it returns (torchvision and timm
    builders: ``def resnet18(*, weights=None, **kwargs) -> ResNet``) also takes
    that class's parameters.
    """
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return {}, {}, True
    params = {n: p for n, p in sig.parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    hints = {k: v for k, v in _hints(target).items() if k in params}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    returns = _hints(target).get("return") if not inspect.isclass(target) else None
    if var_kw and inspect.isclass(returns) and issubclass(returns, nn.Module):
        inner, inner_hints, var_kw = _signature(returns)
        inner = {n: q for n, q in inner.items() if q.default is not q.empty}  # the builder fills the required ones
        params = {**inner, **params}
        hints = {**inner_hints, **hints}
    return params, hints, var_kw


def _fits(value: Any, hint: Any) -> Optional[bool]:
    """Whether plain ``value`` fits a simple annotation; None when the annotation is not a simple one."""
    if hint is Any:
        return None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        results = [_fits(value, h) for h in typing.get_args(hint)]
        if any(r is True for r in results):
            return True
        return False if all(r is False for r in results) else None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, list)
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        return isinstance(value, dict)
    return None


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _check_args(a: ArchSpec, target: Any, label: str, *, closed: Optional[bool] = None,
                required: bool = False) -> list[str]:
    """Check ``a``'s argument names and simple types against ``target``; return the names it takes.

    ``closed`` overrides whether names outside the signature are refused (default:
    refused unless the signature has ``**kwargs``); ``required`` also checks that
    every parameter without a default is given.
    """
    params, hints, var_kw = _signature(target)
    names = list(params)
    if closed is None:
        closed = not var_kw
    for name, value in a.args:
        if name not in params:
            if closed:
                raise ModelLoadError(
                    f"arch {a.spec!r}: {label} takes no argument {name!r}{did_you_mean(name, names)}; "
                    f"it takes {', '.join(names) if names else 'no arguments'}."
                )
            continue
        hint = hints.get(name)
        if hint is not None and _fits(value, hint) is False:
            raise ModelLoadError(
                f"arch {a.spec!r}: {name}={value!r} is a {type(value).__name__}, but {label} expects "
                f"{_type_name(hint)} for {name!r}."
            )
    if required:  # only the target's own parameters: a builder fills its class's required ones
        given = dict(a.args)
        own = inspect.signature(target).parameters if params else {}
        missing = [n for n, p in own.items() if n in params and p.default is p.empty and n not in given]
        if missing:
            raise ModelLoadError(
                f"arch {a.spec!r}: {label} needs argument{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(repr, missing))}: pass --arch-arg {missing[0]}=VALUE (arch_args in Python)."
            )
    return names


class _DebuggerRefused(BaseException):
    """Raised by the breakpoint hook while a factory runs (a BaseException: ``except Exception`` cannot hide it)."""


def _refuse_breakpoint(*_args: Any, **_kwargs: Any) -> None:
    raise _DebuggerRefused()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _guarded(a: ArchSpec, what: str, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` (an import or a factory call) with ``breakpoint()`` refused; exits become ModelLoadErrors.

    Exceptions (``Exception``) pass through for the caller to describe.
    """
    previous = sys.breakpointhook
    sys.breakpointhook = _refuse_breakpoint  # sys.breakpointhook, not PYTHONBREAKPOINT, is what breakpoint() calls
    try:
        return fn()
    except _DebuggerRefused:
        raise ModelLoadError(
            f"arch {a.spec!r}: {what} called breakpoint(); a model factory must build the model without "
            "opening a debugger."
        ) from None
    except SystemExit as exc:
        raise ModelLoadError(
            f"arch {a.spec!r}: {what} exited (SystemExit {exc.code!r}) instead of returning a model."
        ) from None
    except KeyboardInterrupt:
        raise ModelLoadError(f"arch {a.spec!r}: {what} was interrupted (KeyboardInterrupt).") from None
    except Exception:
        raise
    except BaseException as exc:
        raise ModelLoadError(
            f"arch {a.spec!r}: {what} raised {_first_line(exc)} instead of returning a model."
        ) from None
    finally:
        sys.breakpointhook = previous


def _unknown_keyword(exc: TypeError, a: ArchSpec, label: str, names: list[str]) -> Optional[ModelLoadError]:
    """A clear error for ``TypeError: ... unexpected keyword argument 'x'`` when x is one of the user's args."""
    m = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
    if m and m.group(1) in dict(a.args):
        name = m.group(1)
        return ModelLoadError(f"arch {a.spec!r}: {label} takes no argument {name!r}{did_you_mean(name, names)}.")
    return None


# ----------------------------------------------------------------------------- libraries and factories


def _timm(a: ArchSpec) -> nn.Module:
    import timm

    name = a.spec.partition(":")[2]
    base = name.split(".", 1)[0]  # 'resnet18.a1_in1k': the pretrained tag does not change the architecture
    if not timm.is_model(base):
        raise ModelLoadError(
            f"unknown timm model {name!r}{did_you_mean(name, timm.list_models())}. "
            "List them with `python -c \"import timm; print(timm.list_models('resnet*'))\"`."
        )
    # create_model passes **kwargs on (build_model_with_cfg consumes some): names are not refused
    # up front, but types are checked and a TypeError naming one is reported.
    names = _check_args(a, timm.models.model_entrypoint(base), base, closed=False)
    names += [n for n in _signature(timm.create_model)[0] if n not in names]
    try:
        return timm.create_model(name, pretrained=False, **a.kwargs)
    except TypeError as exc:
        raise _unknown_keyword(exc, a, base, names) or exc


def _torchvision(a: ArchSpec) -> nn.Module:
    import torchvision

    name = a.spec.partition(":")[2]
    names = torchvision.models.list_models()
    if name not in names:
        raise ModelLoadError(
            f"unknown torchvision model {name!r}{did_you_mean(name, names)}. "
            "List them with `python -c \"import torchvision; print(torchvision.models.list_models())\"`."
        )
    builder = torchvision.models.get_model_builder(name)
    accepted = _check_args(a, builder, name)
    fixed: dict[str, Any] = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        fixed["weights_backbone"] = None  # segmentation/detection models would fetch a backbone
    try:
        return builder(**{**a.kwargs, **fixed})
    except TypeError as exc:
        raise _unknown_keyword(exc, a, name, accepted) or exc


def _smp(a: ArchSpec) -> nn.Module:
    import segmentation_models_pytorch as smp

    arch, _, encoder = a.spec.partition(":")[2].partition(":")
    classes = {c.__name__.lower(): c for c in smp.MODEL_ARCHITECTURES_MAPPING.values()}
    if arch.lower() not in classes:
        names = [c.__name__ for c in classes.values()]
        raise ModelLoadError(f"unknown smp architecture {arch!r}{did_you_mean(arch, names)}.")
    cls = classes[arch.lower()]
    # The architectures' **kwargs go to the encoder, which ignores names it does not know: a
    # misspelt argument would vanish, so only the named parameters are admitted.
    _check_args(a, cls, cls.__name__, closed=True)
    kwargs = a.kwargs
    encoder = encoder or kwargs.get("encoder_name") or ""
    if encoder:
        encoders = smp.encoders.get_encoder_names()
        if encoder not in encoders:
            raise ModelLoadError(f"unknown smp encoder {encoder!r}{did_you_mean(encoder, encoders)}.")
        kwargs["encoder_name"] = encoder
    kwargs["encoder_weights"] = None
    return smp.create_model(arch, **kwargs)


def _import(a: ArchSpec, module_name: str) -> types.ModuleType:
    try:
        return _guarded(a, f"importing {module_name!r}", lambda: importlib.import_module(module_name))
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            parent, _, leaf = missing.rpartition(".")
            try:
                found = pkgutil.iter_modules(importlib.import_module(parent).__path__) if parent \
                    else pkgutil.iter_modules()
                options = [m.name for m in found]
            except Exception:
                options = []
            raise ModelLoadError(
                f"arch {a.spec!r}: cannot import module {module_name!r}: no module named "
                f"{missing!r}{did_you_mean(leaf, options)}; add the directory that holds it to PYTHONPATH."
            ) from None
        raise ModelLoadError(
            f"arch {a.spec!r}: cannot import module {module_name!r}: it needs {missing!r}, which is not installed."
        ) from None
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"arch {a.spec!r}: cannot import module {module_name!r}: importing it failed ({_first_line(exc)})."
        ) from None


def _factory(a: ArchSpec) -> nn.Module:
    module_name, _, attr = a.spec.partition(":")
    obj: Any = _import(a, module_name)
    for part in attr.split("."):
        try:
            found = inspect.getattr_static(obj, part)
        except AttributeError:
            options = [n for n in dir(obj) if not n.startswith("_")]
            raise ModelLoadError(
                f"arch {a.spec!r}: {module_name!r} has no {attr!r}{did_you_mean(part, options)}."
            ) from None
        obj = getattr(obj, part) if isinstance(found, (classmethod, staticmethod)) else found
    if inspect.isclass(obj):
        if not issubclass(obj, nn.Module):
            raise ModelLoadError(
                f"arch {a.spec!r}: {attr} is a class but not a torch.nn.Module subclass; name the model's "
                "class or a function that builds it."
            )
    elif not inspect.isroutine(obj):
        raise ModelLoadError(
            f"arch {a.spec!r}: {attr} is a {type(obj).__name__}, not a class or a function; name the "
            "model's class or a function that builds it."
        )
    label = f"{attr}()"
    names = _check_args(a, obj, label, required=True)
    kwargs = a.kwargs
    try:
        model = _guarded(a, label, lambda: obj(**kwargs))
    except TypeError as exc:
        raise _unknown_keyword(exc, a, label, names) or exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"arch {a.spec!r}: {label} returned a value of type {type(model).__name__}, not a torch.nn.Module; name the "
            "model's class or a function that builds it."
        )
    return model


def import_arch_module(a: ArchSpec) -> None:
    """Import the module :func:`build_arch` would import for ``a`` (guarded as there), without building.

    Lets a caller build afterwards under a device context (``torch.device("meta")``) without
    the import itself running under it. Raises what the import would raise in :func:`build_arch`.
    """
    library = {"timm": "timm", "torchvision": "torchvision", "smp": "segmentation_models_pytorch",
               "demo": "dsrewrite.demo"}.get(a.library)
    _import(a, library or a.spec.partition(":")[0])


def build_arch(spec: Union[str, ArchSpec], arch_args: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """Build a model with random weights from an arch spec and its arguments (never downloads).

    Forms: ``demo``, ``timm:NAME``, ``torchvision:NAME``, ``smp:ARCH[:ENCODER]``,
    ``package.module:factory`` (see the module docstring); ``arch_args`` are the
    factory's keyword arguments, plain data.

    Raises:
        ModelLoadError: the spec or an argument is refused (see :func:`arch_spec`),
            names an unknown model, module or attribute, or building failed; the
            message names the spec and the argument.

    Example:
        >>> build_arch("timm:resnet18", {"num_classes": 7}).fc.out_features
        7
        >>> build_arch("timm:resnet81")
        Traceback (most recent call last):
        ...
        dsrewrite.errors.ModelLoadError: unknown timm model 'resnet81' (did you mean 'resnet18'?). List them with `python -c "import timm; print(timm.list_models('resnet*'))"`.
        >>> build_arch("smp:Unet", {"clases": 3})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        dsrewrite.errors.ModelLoadError: arch 'smp:Unet': Unet takes no argument 'clases' (did you mean 'classes'?); it takes encoder_name, ...
    """
    a = arch_spec(spec, arch_args)
    if a.library == "demo":
        from ..demo import build_demo

        return build_demo(a.spec)
    builders = {"timm": _timm, "torchvision": _torchvision, "smp": _smp, "factory": _factory}
    try:
        model = _guarded(a, "building the model", lambda: builders[a.library](a))
    except ModelLoadError:
        raise
    except ImportError as exc:
        extra = {"timm": "timm", "smp": "smp"}.get(a.library)
        hint = f" Hint: pip install 'dsrewrite[{extra}]'." if extra else ""
        raise ModelLoadError(f"arch {a.spec!r} needs a package that is not installed ({_first_line(exc)}).{hint}"
                             ) from None
    except Exception as exc:
        raise ModelLoadError(f"arch {a}: building the model failed ({_first_line(exc)}).") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"arch {a.spec!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model
