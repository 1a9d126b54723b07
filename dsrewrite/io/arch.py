"""Architecture specs: build a model with random weights from ``timm:resnet18``, ``smp:Unet:resnet18``, ...

Forms: ``demo``, ``timm:NAME``, ``torchvision:NAME``, ``smp:ARCH[:ENCODER]``
(segmentation_models_pytorch, ``encoder_weights=None``) and
``package.module:factory`` (imported and called with no arguments). Nothing is
ever downloaded.

Example:
    >>> type(build_arch("torchvision:resnet18")).__name__
    'ResNet'
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

from torch import nn

from ..errors import ModelLoadError, did_you_mean

__all__ = ["build_arch", "ARCH_EXAMPLES", "ARCH_FLAG_EXAMPLES"]

ARCH_EXAMPLES = "'timm:resnet18', 'torchvision:resnet18', 'smp:Unet:resnet18' or 'mypkg.models:build_model'"
ARCH_FLAG_EXAMPLES = (
    "--arch timm:resnet18, --arch torchvision:resnet18, --arch smp:Unet:resnet18 or --arch mypkg.models:build_model"
)


def _timm(name: str) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError as exc:
        if "Unknown model" not in str(exc):
            raise
        raise ModelLoadError(
            f"unknown timm model {name!r}{did_you_mean(name, timm.list_models())}. "
            "List them with `python -c \"import timm; print(timm.list_models('resnet*'))\"`."
        ) from None


def _torchvision(name: str) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise ModelLoadError(
            f"unknown torchvision model {name!r}{did_you_mean(name, names)}. "
            "List them with `python -c \"import torchvision; print(torchvision.models.list_models())\"`."
        )
    builder = torchvision.models.get_model_builder(name)
    kwargs: dict[str, Any] = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # segmentation/detection models would fetch a backbone
    return builder(**kwargs)


def _smp(rest: str) -> nn.Module:
    import segmentation_models_pytorch as smp

    arch, _, encoder = rest.partition(":")
    archs = {a.__name__.lower(): a.__name__ for a in smp.MODEL_ARCHITECTURES_MAPPING.values()} \
        if hasattr(smp, "MODEL_ARCHITECTURES_MAPPING") else {}
    if archs and arch.lower() not in archs:
        raise ModelLoadError(f"unknown smp architecture {arch!r}{did_you_mean(arch, archs.values())}.")
    kwargs: dict[str, Any] = {"encoder_weights": None}
    if encoder:
        encoders = smp.encoders.get_encoder_names()
        if encoder not in encoders:
            raise ModelLoadError(f"unknown smp encoder {encoder!r}{did_you_mean(encoder, encoders)}.")
        kwargs["encoder_name"] = encoder
    return smp.create_model(arch, **kwargs)


def _factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"arch {spec!r}: cannot import module {module_name!r} ({exc}). Run from the directory "
            "that holds it or add it to PYTHONPATH."
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            options = [n for n in dir(obj) if not n.startswith("_")]
            raise ModelLoadError(f"arch {spec!r}: {module_name!r} has no {attr!r}{did_you_mean(part, options)}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"arch {spec!r}: {attr!r} is not callable; name a class or factory function.")
    try:
        model = obj()
    except Exception as exc:
        raise ModelLoadError(
            f"arch {spec!r}: calling {attr}() failed ({type(exc).__name__}: {exc}); the factory "
            "must build the model with no arguments."
        ) from exc
    return model


def build_arch(spec: str) -> nn.Module:
    """Build a model with random weights from an arch spec (never downloads).

    Forms: ``demo``, ``timm:NAME``, ``torchvision:NAME``, ``smp:ARCH[:ENCODER]``,
    ``package.module:factory``.

    Example:
        >>> type(build_arch("timm:resnet18")).__name__
        'ResNet'
        >>> build_arch("timm:resnet81")
        Traceback (most recent call last):
        ...
        dsrewrite.errors.ModelLoadError: unknown timm model 'resnet81' (did you mean 'resnet18'?). List them with `python -c "import timm; print(timm.list_models('resnet*'))"`.
    """
    spec = str(spec).strip()
    if spec == "demo":
        from ..demo import demo_unet

        return demo_unet()
    prefix, sep, rest = spec.partition(":")
    if not sep or not prefix or not rest or not re.fullmatch(r"[A-Za-z_][\w.]*", prefix):
        raise ModelLoadError(f"unknown arch spec {spec!r}: use 'demo', {ARCH_EXAMPLES}.")
    try:
        if prefix == "timm":
            model = _timm(rest)
        elif prefix == "torchvision":
            model = _torchvision(rest)
        elif prefix == "smp":
            model = _smp(rest)
        else:
            model = _factory(spec)
    except ModelLoadError:
        raise
    except ImportError as exc:
        raise ModelLoadError(f"arch {spec!r} needs a package that is not installed ({exc}).") from exc
    except Exception as exc:
        raise ModelLoadError(f"arch {spec!r}: building the model failed ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"arch {spec!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model
