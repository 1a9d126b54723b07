# SPDX-License-Identifier: Apache-2.0
"""Plan under a budget: candidates → sensitivity → allocation → a :class:`~dsrewrite.planning.types.Plan`.

The recipe decides WHICH convs may change (its selection); the budget decides HOW each one
changes: kept dense, or a kind at a depth multiplier, so that the whole model fits the budget
with the least predicted output error. Each selected conv's plan entry says what was chosen and
why (its share of the model's MACs, its predicted error, how much the chosen multiplier cuts it);
the plan's notes give the budget, the planned totals, the predicted output error and how the
sensitivity was obtained (``data`` or the ``weights`` proxy).

An impossible budget (even every selected conv at its cheapest candidate leaves too many MACs)
is refused before the sensitivity is computed, naming the smallest reachable figure.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dsrewrite.budget.types import parse_budget
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    >>> x = torch.randn(1, 3, 16, 16)
    >>> bp = plan_with_budget(net, "all_3x3", x, parse_budget({"macs": 0.6}))
    >>> bp.planned_macs <= bp.budget_value, bp.sensitivity.method
    (True, 'weights')
    >>> plan_with_budget(net, "all_3x3", x, parse_budget({"macs": 1000}))
    Traceback (most recent call last):
    ...
    dsrewrite.budget.types.BudgetError: budget macs 1,000 cannot be met: with every selected conv (1 of recipe 'all_3x3') at its cheapest candidate the model has 212,992 MACs (30.4% of 700,416). Hint: ask for at least 212,992 MACs (0.304 of the model), or select more convs (another recipe).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

from torch import nn

from ..kinds import auto_kinds
from ..measure.macs import count_costs
from ..planning.capture import capture
from ..planning.safety import check_safety
from ..planning.planner import NothingSelectedWarning, RecipeLike, plan_from_capture
from ..planning.types import LayerConfig, Plan, PlanEntry
from ..recipe import load_recipe, select
from ..recipe.schema import AUTO, LatencySpec
from .allocate import Allocation, Infeasible, Option, Unreachable, allocate, cheapest
from .candidates import LayerCandidates, layer_candidates
from .latency_costs import LatencyCosts, LatencyTimer, confirm_choice, measure_latency_costs
from .sensitivity import Sensitivity, data_sensitivity, weight_sensitivity
from .types import Budget, BudgetError

__all__ = ["BudgetPlan", "plan_with_budget", "budget_problem", "BudgetProblem"]


@dataclass(frozen=True)
class BudgetProblem:
    """Everything the allocation needs: the selected convs' candidates and the whole model's counts.

    ``fixed_macs``/``fixed_params``: what the rest of the model costs (never changed).
    """

    base: Plan
    layers: tuple[LayerCandidates, ...]
    total_macs: int
    total_params: int
    fixed_macs: int
    fixed_params: int

    def totals(self, choice: Sequence[int]) -> tuple[int, int]:
        """Whole-model ``(MACs, params)`` with candidate ``choice[i]`` for layer ``i``."""
        macs = self.fixed_macs + sum(l.candidates[i].macs for l, i in zip(self.layers, choice))
        params = self.fixed_params + sum(l.candidates[i].params for l, i in zip(self.layers, choice))
        return macs, params


@dataclass(frozen=True)
class BudgetPlan:
    """The plan and what led to it: the allocation, its predicted output error, the sensitivity."""

    plan: Plan
    problem: BudgetProblem
    allocation: Allocation
    sensitivity: Sensitivity
    budget: Budget
    budget_key: str
    budget_value: Optional[int]
    planned_macs: int
    planned_params: int
    #: the measured times of a ``latency_ms`` budget (``budget_value`` is then in nanoseconds)
    latency: Optional[LatencyCosts] = None

    @property
    def predicted_error(self) -> float:
        """Predicted relative L2 output error of the planned model (after calibration's first refit step)."""
        return math.sqrt(max(self.allocation.error, 0.0))


def budget_problem(model: nn.Module, recipe: RecipeLike, example_inputs: Any, *, order: Optional[str] = None,
                   init: Optional[str] = None, max_m: Optional[int] = None) -> BudgetProblem:
    """Capture, plan the recipe's selection, count the model and list every selected conv's candidates."""
    rec = load_recipe(recipe).with_overrides(order=order, init=init)
    safety = check_safety(model, example_inputs)  # as plan_checked: parameter reads, hooks, lazy convs kept dense
    cap = capture(model, example_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingSelectedWarning)
        base = plan_from_capture(model, rec, cap, safety=safety)
    costs = count_costs(model, example_inputs)
    modules = dict(model.named_modules())
    facts = cap.by_name()
    specs = {s.fact.name: s.replace for s in select(rec, cap.facts) if s.selected and s.replace is not None}
    layers = []
    for e in base.replaced:
        mc = costs.modules.get(e.name)
        spec = specs.get(e.name)
        if mc is None or mc.calls != 1 or spec is None or e.config is None:
            continue
        kinds = tuple(k.name for k in auto_kinds()) if spec.order == AUTO else (e.config.order,)
        layers.append(layer_candidates(facts[e.name], modules[e.name], kinds, dense_macs=mc.macs, max_m=max_m))
    fixed_macs = costs.total_macs - sum(l.candidates[0].macs for l in layers)
    fixed_params = costs.total_params - sum(l.candidates[0].params for l in layers)
    return BudgetProblem(base, tuple(layers), costs.total_macs, costs.total_params, fixed_macs, fixed_params)


def _pct(x: int, whole: int) -> str:
    return f"{100.0 * x / whole:.2f}%" if whole else "n/a"


def _reason(lc: LayerCandidates, sens: Any, i: int, total_macs: int, cost_key: str) -> str:
    c = lc.candidates[i]
    errs = sens.errors
    dense = lc.candidates[0]
    if c.dense:
        sep = [j for j in range(1, len(lc.candidates))]
        if not sep:
            return "kept dense (budget): no separable candidate costs fewer MACs"
        j = min(sep, key=lambda j: (lc.candidates[j].macs, j))
        cj = lc.candidates[j]
        return (f"kept dense (budget): the cheapest candidate, {cj.label}, would save "
                f"{_pct(dense.macs - cj.macs, total_macs)} of the model's MACs but add {errs[j]:.3g} to the "
                f"predicted squared output error")
    text = (f"budget: {c.label}: {_pct(c.macs, total_macs)} of the model's MACs (dense {_pct(dense.macs, total_macs)}),"
            f" predicted squared output error {errs[i]:.3g}")
    prev = [j for j, d in enumerate(lc.candidates) if d.kind == c.kind and d.m == c.m - 1]
    if prev and errs[prev[0]] > 0:
        text += f"; m={c.m - 1} → m={c.m} cuts it by {100.0 * (1 - errs[i] / errs[prev[0]]):.0f}%"
    return text


def plan_with_budget(
    model: nn.Module,
    recipe: RecipeLike,
    example_inputs: Any,
    budget: Budget,
    *,
    calibration: Optional[Sequence[Any]] = None,
    order: Optional[str] = None,
    init: Optional[str] = None,
    max_positions: int = 4096,
    gain_images: Optional[int] = None,
    max_m: Optional[int] = None,
    latency_timer: Optional[LatencyTimer] = None,
) -> BudgetPlan:
    """The plan of ``recipe``'s selection that best fits ``budget`` (see the module doc).

    ``calibration``: model inputs (already through :func:`~dsrewrite.refit.batches.iter_inputs`) for the
    data sensitivity; ``None`` uses the weight-space proxy. ``order="auto"`` lets every auto kind compete.
    A ``latency_ms`` budget times the dense model and every candidate first
    (:mod:`~dsrewrite.budget.latency_costs`; ``latency_timer`` replaces the timings, e.g. in tests).

    Raises:
        BudgetError: the budget cannot be met (the smallest reachable figure, or the best reachable error).
        RecipeError: the recipe is not valid.
    """
    lat_spec = None
    if budget.latency_ms is not None:  # the budget, not latency.min_speedup, decides; the section says how to time
        rec = load_recipe(recipe)
        lat_spec, recipe = rec.latency or LatencySpec(), replace(rec, latency=None)
    prob = budget_problem(model, recipe, example_inputs, order=order, init=init, max_m=max_m)
    key = budget.cost_key
    rec_name = prob.base.recipe
    if not prob.layers:
        raise BudgetError(f"{budget.source}: recipe {rec_name!r} selects no conv that a budget can change "
                          f"({len(prob.base.replaced)} selected). Hint: `dsrewrite plan` shows why each was skipped.")
    lat = None
    if lat_spec is not None:
        lat = measure_latency_costs(model, prob.layers, example_inputs, spec=lat_spec, timer=latency_timer,
                                    configs={e.name: e.config for e in prob.base.entries}, base=prob.base)
        groups_cost = [lat.costs_ns(i) for i in range(len(prob.layers))]
        fixed, limit = lat.fixed_ns, lat.limit_ns(budget)
        reach = fixed + cheapest([[Option(c, 0.0) for c in g] for g in groups_cost]).cost
        if reach > limit:
            raise lat.unmet(limit, reach, len(prob.layers), rec_name)
    else:
        groups_cost = [lc.cost(key or "macs") for lc in prob.layers]
        whole = prob.total_macs if key != "params" else prob.total_params
        fixed = prob.fixed_macs if key != "params" else prob.fixed_params
        limit = budget.absolute(key, whole) if key else None
    if limit is not None and lat is None:
        low = cheapest([[Option(c, 0.0) for c in g] for g in groups_cost])
        if fixed + low.cost > limit:
            reach = fixed + low.cost
            unit = "MACs" if key == "macs" else "params"
            raise BudgetError(
                f"budget {key} {limit:,} cannot be met: with every selected conv ({len(prob.layers)} of recipe "
                f"{rec_name!r}) at its cheapest candidate the model has {reach:,} {unit} "
                f"({100.0 * reach / whole:.1f}% of {whole:,}). Hint: ask for at least {reach:,} {unit} "
                f"({reach / whole:.3g} of the model), or select more convs (another recipe).")
    if calibration:
        sens = data_sensitivity(model, prob.layers, calibration, max_positions=max_positions, gain_images=gain_images)
    else:
        sens = weight_sensitivity(model, prob.layers, example_inputs)
    ceiling = None if budget.max_error is None else budget.max_error ** 2

    def choose(costs: list[list[int]]) -> Allocation:
        groups = [[Option(c, e) for c, e in zip(gc, ls.errors)] for gc, ls in zip(costs, sens.layers)]
        return allocate(groups, max_cost=None if limit is None else limit - fixed, max_error=ceiling)

    try:
        alloc = choose(groups_cost)
        if lat is not None:  # the chosen blocks re-timed with more rounds, re-allocated until confirmed
            lat, again = confirm_choice(model, prob.layers, lat, alloc.choice, choose, timer=latency_timer,
                                        configs={e.name: e.config for e in prob.base.entries})
            alloc = again or alloc
    except Infeasible as exc:  # MACs/params: checked above; latency: a fastest block re-timed slower
        if lat is not None and limit is not None:
            raise lat.unmet(limit, fixed + exc.cheapest, len(prob.layers), rec_name) from exc
        raise BudgetError(f"budget {key} {limit:,} cannot be met (cheapest {fixed + exc.cheapest:,})") from exc
    except Unreachable as exc:
        best = exc.best
        macs, _ = prob.totals(best.choice)
        within = f" within {key} {limit:,}" if limit is not None else ""
        if lat is not None and limit is not None:
            within = f" within {lat.describe_limit(limit)} (predicted {lat.predicted_ms(best.choice):.3g} ms)"
        raise BudgetError(
            f"{budget.source}: max_error {budget.max_error:g} cannot be met{within}: the best reachable predicted "
            f"output error is {math.sqrt(best.error):.4g} (at {macs:,} MACs, {_pct(macs, prob.total_macs)} of the "
            f"model). Hint: raise max_error to at least {math.sqrt(best.error):.4g}"
            f"{', or the cost target' if limit is not None else ''}.") from exc
    return _build(prob, sens, alloc, budget, key or "macs", limit, lat)


def _build(prob: BudgetProblem, sens: Sensitivity, alloc: Allocation, budget: Budget, key: str,
           limit: Optional[int], lat: Optional[LatencyCosts] = None) -> BudgetPlan:
    chosen = {lc.name: (n, lc, ls, i) for n, (lc, ls, i) in enumerate(zip(prob.layers, sens.layers, alloc.choice))}
    entries = []
    for e in prob.base.entries:
        if e.name not in chosen:
            entries.append(e)
            continue
        n, lc, ls, i = chosen[e.name]
        c = lc.candidates[i]
        why = _reason(lc, ls, i, prob.total_macs, key) if lat is None else lat.reason(n, lc, ls.errors, i)
        measured = e.measured if lat is None else {**(e.measured or {}), **lat.measured(n, i)}
        if c.dense:
            entries.append(PlanEntry(e.name, "skip", f"{why}; {e.reason}", fact=e.fact, measured=measured))
            continue
        cfg = e.config or LayerConfig()
        new = replace(cfg, order=c.kind, depth_multiplier=c.m, note=f"chosen by the budget ({sens.method} sensitivity)")
        entries.append(PlanEntry(e.name, "replace", f"{why}; {e.reason}", config=new, fact=e.fact,
                                 measured=measured))
    macs, params = prob.totals(alloc.choice)
    pred = math.sqrt(max(alloc.error, 0.0))
    target = f"{limit:,} {key}" if limit is not None else f"predicted output error ≤ {budget.max_error:g}"
    if lat is not None and limit is not None:
        target = f"{lat.describe_limit(limit)}; predicted {lat.predicted_ms(alloc.choice):.3g} ms"
    notes = [
        *prob.base.notes,
        f"budget ({budget.source}: {budget.describe()}): target {target}; planned {macs:,} MACs "
        f"({_pct(macs, prob.total_macs)} of {prob.total_macs:,}), {params:,} params "
        f"({_pct(params, prob.total_params)}); predicted output rel error {pred:.4g}",
        f"allocation: {alloc.method} over {len(prob.layers)} convs, "
        f"{sum(len(l.candidates) for l in prob.layers)} candidates",
        sens.note,
        *(lat.notes(alloc.choice, limit) if lat is not None and limit is not None else ()),
    ]
    plan = replace(prob.base, entries=tuple(entries), notes=tuple(notes))
    return BudgetPlan(plan, prob, alloc, sens, budget, key, limit, macs, params, lat)
