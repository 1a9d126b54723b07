# SPDX-License-Identifier: Apache-2.0
"""Moved to :mod:`dsrewrite.measure.macs`; this path re-exports it for one minor version."""

from __future__ import annotations

from .runtime.run import evaluating, call_model, run_model, describe_inputs
from .measure.macs import (
    ModuleCost,
    LayerCost,
    ModelCosts,
    FlopCheck,
    ROOT_REGION,
    NOT_COUNTED,
    is_counted_module,
    module_macs,
    count_params,
    count_costs,
    layer_costs,
    region_of,
    region_costs,
    flop_counter_check,
    measure,
)

__all__ = [
    "ModuleCost",
    "LayerCost",
    "ModelCosts",
    "FlopCheck",
    "ROOT_REGION",
    "NOT_COUNTED",
    "is_counted_module",
    "module_macs",
    "count_params",
    "count_costs",
    "layer_costs",
    "region_of",
    "region_costs",
    "flop_counter_check",
    "measure",
    "evaluating",
    "call_model",
    "run_model",
    "describe_inputs",
]
