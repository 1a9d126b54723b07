# SPDX-License-Identifier: Apache-2.0
"""dsrewrite: swap dense k×k convolutions in a trained PyTorch model for depthwise-separable ones.

The data flow: capture → facts → recipe → plan → apply → report → save. The whole
documented workflow is importable from here; the heavy parts load on first use, so
``import dsrewrite`` stays light.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import dsrewrite
    >>> net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1))
    >>> light = dsrewrite.rewrite(net, "all_3x3", example_inputs=torch.randn(1, 3, 32, 32))
    >>> type(light[2]).__name__, light[2].depthwise.groups, type(net[2]).__name__
    ('DepthwiseSeparableConv2d', 32, 'Conv2d')
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    CalibrationError,
    CaptureError,
    DsRewriteError,
    InputShapeError,
    ModelLoadError,
    OutputError,
    PlanError,
    RecipeError,
    RewriteError,
    UnsafePickleError,
    UnsupportedConvError,
    UnsupportedModelError,
    UsageError,
)

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first access).
_LAZY: dict[str, str] = {
    # rewrite
    "rewrite": "dsrewrite.api",
    "rewrite_and_report": "dsrewrite.api",
    "rewrite_with_plan": "dsrewrite.api",
    "RewriteResult": "dsrewrite.api",
    "example_input": "dsrewrite.runtime.preflight",
    # recipe → plan → apply
    "load_recipe": "dsrewrite.recipe",
    "builtin_recipes": "dsrewrite.recipe",
    "capture": "dsrewrite.planning.capture",
    "plan": "dsrewrite.planning.planner",
    "apply_plan": "dsrewrite.planning.apply",
    "LayerConfig": "dsrewrite.planning.types",
    "Plan": "dsrewrite.planning.types",
    "PlanEntry": "dsrewrite.planning.types",
    "DepthwiseSeparableConv2d": "dsrewrite.kinds.separable",
    # refit
    "calibrate": "dsrewrite.refit.calibrate",
    "CalibrationResult": "dsrewrite.refit.results",
    "heal": "dsrewrite.refit.heal",
    "HealResult": "dsrewrite.refit.heal",
    "HealStep": "dsrewrite.refit.heal",
    "SeededBatches": "dsrewrite.refit.order",
    # report
    "build_report": "dsrewrite.report",
    # deploy
    "prepare_for_deployment": "dsrewrite.deploy.prepare",
    "export_onnx": "dsrewrite.deploy.onnx",
    "fold_batchnorm": "dsrewrite.deploy.bn",
    "hoist_pointwise": "dsrewrite.deploy.hoist",
    # io
    "load_model": "dsrewrite.io.load",
    "save_rewrite": "dsrewrite.io.save",
    "load_rewrite": "dsrewrite.io.save",
}

__all__ = [
    "__version__",
    *_LAZY,
    "DsRewriteError",
    "UsageError",
    "RecipeError",
    "ModelLoadError",
    "UnsafePickleError",
    "OutputError",
    "InputShapeError",
    "UnsupportedModelError",
    "UnsupportedConvError",
    "CaptureError",
    "PlanError",
    "RewriteError",
    "CalibrationError",
]


def __getattr__(name: str) -> Any:
    """Load a public name's module on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dsrewrite' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
