"""dsrewrite: swap dense k×k convolutions in a trained PyTorch model for depthwise-separable ones.

The data flow: capture → facts → recipe → plan → apply → report → save.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import dsrewrite
    >>> net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1))
    >>> light = dsrewrite.rewrite(net, "all_3x3", example_inputs=torch.randn(1, 3, 32, 32))
    >>> type(light[2]).__name__, light[2].depthwise.groups, type(net[2]).__name__
    ('DepthwiseSeparableConv2d', 32, 'Conv2d')
"""

from .api import RewriteResult, example_input, rewrite, rewrite_and_report, rewrite_with_plan
from .apply import apply_plan
from .errors import DsRewriteError, UnsupportedModelError
from .layers import DepthwiseSeparableConv2d
from .planner import plan
from .plan_types import LayerConfig, Plan, PlanEntry
from .recipe import builtin_recipes, load_recipe

__version__ = "0.1.0"

__all__ = [
    "DepthwiseSeparableConv2d",
    "DsRewriteError",
    "UnsupportedModelError",
    "LayerConfig",
    "Plan",
    "PlanEntry",
    "RewriteResult",
    "__version__",
    "apply_plan",
    "builtin_recipes",
    "example_input",
    "load_recipe",
    "plan",
    "rewrite",
    "rewrite_and_report",
    "rewrite_with_plan",
]
