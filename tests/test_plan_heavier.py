# SPDX-License-Identifier: Apache-2.0
"""A replaced conv whose block costs at least as many MACs as the dense conv is said so in its plan reason."""

from __future__ import annotations

import torch
from torch import nn

import dsrewrite
from dsrewrite.measure.macs import module_macs
from dsrewrite.planning.planner import separable_macs


def _plan(model: nn.Module, recipe: dict) -> dict:
    torch.manual_seed(0)
    p = dsrewrite.plan(model, recipe, torch.randn(1, 32, 16, 16))
    return {e.name: e for e in p.entries}


def test_a_heavier_block_is_noted_and_a_lighter_one_is_not() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 16, 3, padding=1, groups=16)).eval()
    everything = {"in_channels": {"min": 1}, "out_channels": {"min": 1}, "groups": "any"}
    light = _plan(model, {"name": "m1", "select": everything})
    assert light["0"].action == "replace" and "not lighter" not in light["0"].reason, light["0"].reason
    # a grouped conv with 2 input channels per group: dw (9·32·HW) + grouped pw (2·16·HW) > dense (9·2·16·HW)
    assert "not lighter than the dense conv" in light["1"].reason and "keep it dense" in light["1"].reason
    heavy = _plan(model, {"name": "m9", "select": everything, "replace": {"depth_multiplier": 9}})
    reason = heavy["0"].reason
    assert "not lighter than the dense conv" in reason and "lower depth_multiplier" in reason, reason
    fact = heavy["0"].fact
    dense = module_macs(model[0], (1, 32, 16, 16), (1, 32, 16, 16))
    assert f"{dense:,} dense" in reason, reason
    assert dense == 9 * 32 * 32 * 16 * 16
    assert heavy["0"].config is not None and fact is not None
