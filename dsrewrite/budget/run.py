# SPDX-License-Identifier: Apache-2.0
"""What the API does around a budget: the calibration inputs, the plan, and the check of the result.

:func:`checked_result` counts the MACs (and parameters) of the rewritten model with
:mod:`dsrewrite.measure.macs` and refuses a result over the budget (a
:class:`~dsrewrite.errors.RewriteError`: the plan's arithmetic and the count disagree, a bug), and
puts the output error measured after calibration next to the predicted one in the plan's notes.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dsrewrite.api import rewrite_and_report
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    >>> x = torch.randn(2, 3, 16, 16)
    >>> res = rewrite_and_report(net, "all_3x3", example_inputs=x[:1], calibration=[x], budget={"macs": 0.6})
    >>> [n.split(":")[0] for n in res.plan.notes if n.startswith("budget check")]
    ['budget check']
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Optional

from torch import nn

from ..errors import RewriteError, UsageError
from ..measure.macs import count_costs
from .latency_costs import NS_PER_MS, latency_check
from .planner import BudgetPlan, plan_with_budget
from .types import Budget

__all__ = ["budget_inputs", "plan_for", "checked_result"]


def budget_inputs(model: nn.Module, example_inputs: Any, calibration: Optional[Iterable[Any]],
                  calib_options: dict[str, Any]) -> Optional[list[Any]]:
    """The calibration batches as model inputs (once), or ``None``; pops ``input_key``/``input_fn`` from the options."""
    key, fn = calib_options.pop("input_key", None), calib_options.pop("input_fn", None)
    if calibration is None:
        return None
    from ..refit.batches import input_spec, iter_inputs

    spec = input_spec(model, example_inputs, input_key=key, input_fn=fn, where="calibration")
    inputs = list(iter_inputs(calibration, spec))
    if not inputs:
        raise UsageError("calibration data gave no batch (an empty list or loader): pass a few batches of "
                         "inputs, or calibration=None for no refit.")
    return inputs


def plan_for(model: nn.Module, recipe: Any, example_inputs: Any, budget: Budget, inputs: Optional[list[Any]], *,
             depth_multiplier: Optional[int], order: Optional[str], init: Optional[str]) -> BudgetPlan:
    """:func:`~dsrewrite.budget.planner.plan_with_budget`, refusing a depth multiplier given with a budget."""
    if depth_multiplier is not None:
        raise UsageError(f"{budget.source}: a budget chooses each conv's depth multiplier; do not also give "
                         f"depth_multiplier={depth_multiplier} (--depth-multiplier).")
    return plan_with_budget(model, recipe, example_inputs, budget, calibration=inputs, order=order, init=init)


def checked_result(res: Any, bp: BudgetPlan, example_inputs: Any, dense: Optional[nn.Module] = None) -> Any:
    """``res`` (a :class:`~dsrewrite.api.RewriteResult`) with the budget check in its plan's notes.

    A ``latency_ms`` budget adds a ``latency check`` note when ``res`` has a report (``rewrite`` returns only
    the model: nothing would show the note, so it is not timed): the result timed against ``dense`` (the
    original model; ``None`` when it was rewritten in place) next to the target and the prediction.
    """
    costs = count_costs(res.model, example_inputs)
    counted = costs.total_macs if bp.budget_key == "macs" else costs.total_params
    if bp.budget_value is not None and bp.latency is None and counted > bp.budget_value:
        raise RewriteError(f"the rewritten model has {counted:,} {bp.budget_key} counted, over the budget's "
                           f"{bp.budget_value:,} (planned {bp.planned_macs:,} MACs): a bug, please report it.")
    note = (f"budget check: counted on the result {costs.total_macs:,} MACs, {costs.total_params:,} params; "
            f"predicted output rel error {bp.predicted_error:.4g}")
    cal = getattr(res, "calibration", None)
    measured = getattr(cal, "output_rel_error_after", None)
    if measured is not None and math.isfinite(measured):
        ratio = measured / bp.predicted_error if bp.predicted_error > 0 else math.inf
        note += (f", measured after calibration on the calibration inputs {measured:.4g} "
                 f"({ratio:.2f}× the prediction)")
    else:
        note += " (no calibration data: not measured)"
    notes = [note]
    if bp.latency is not None and bp.budget_value is not None and res.report is not None:
        lat = bp.latency
        notes.append(latency_check(dense, res.model, example_inputs, target_ms=bp.budget_value / NS_PER_MS,
                                   predicted_ms=lat.predicted_ms(bp.allocation.choice),
                                   planned_dense_ms=lat.model_ms, spec=lat.spec))
    res.plan = dataclasses.replace(res.plan, notes=(*res.plan.notes, *notes))
    if res.report is not None and hasattr(res.report, "plan_notes"):
        try:
            res.report.plan_notes = res.plan.notes
        except (AttributeError, dataclasses.FrozenInstanceError):  # pragma: no cover - a frozen report
            pass
    return res
