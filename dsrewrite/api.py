# SPDX-License-Identifier: Apache-2.0
"""The Python API: ``rewrite(model)`` and ``rewrite_and_report(model)``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import dsrewrite
    >>> net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    >>> light = dsrewrite.rewrite(net, "all_3x3", example_inputs=torch.randn(1, 3, 32, 32))
    >>> type(light[2]).__name__, type(net[2]).__name__
    ('DepthwiseSeparableConv2d', 'Conv2d')
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch  # noqa: F401  (the doctests use it)
from torch import Tensor, nn

from .errors import UnsupportedModelError, UsageError  # noqa: F401  (dsrewrite.api.UnsupportedModelError, old path)
from .planning.apply import apply_checked, check_rewritable
from .planning.planner import NothingSelectedWarning, RecipeLike, plan as make_plan, plan_checked
from .measure.task import TaskMetric, TaskScores
from .planning.types import Plan
from .recipe import load_recipe
from .runtime.memory import release_free_memory
from .runtime.preflight import Preflight, example_input, preflight
from .runtime.preflight import unwrap_for_rewrite  # noqa: F401  (dsrewrite.api.unwrap_for_rewrite, old path)

__all__ = ["rewrite", "rewrite_and_report", "rewrite_with_plan", "plan_rewrite", "RewriteResult"]

_PREFIX = "module."


def _rewrap(outer: Optional[nn.Module], rewritten: nn.Module, inplace: bool) -> nn.Module:
    """The wrapper class back around the rewritten model (DataParallel), or the bare model (DDP)."""
    if outer is None:
        return rewritten
    if inplace:
        return outer  # its inner model was rewritten in place
    if isinstance(outer, nn.DataParallel) and not isinstance(outer, nn.parallel.DistributedDataParallel):
        return nn.DataParallel(
            rewritten,
            device_ids=getattr(outer, "device_ids", None) or None,
            output_device=getattr(outer, "output_device", None),
            dim=getattr(outer, "dim", 0),
        )
    return rewritten  # DDP needs the process group, torch.compile a new compile: the caller wraps it again


def _unprefixed(plan: Plan, inner: nn.Module) -> Plan:
    """A plan made on the wrapper (``module.`` names) rewritten to the inner model's names."""
    names = dict(inner.named_modules())
    if all(e.name in names for e in plan.replaced):
        return plan
    if not all(e.name.startswith(_PREFIX) and e.name[len(_PREFIX):] in names for e in plan.replaced):
        return plan  # apply_plan explains which name does not fit
    entries = tuple(
        dataclasses.replace(e, name=e.name[len(_PREFIX):]) if e.name.startswith(_PREFIX) else e
        for e in plan.entries
    )
    return dataclasses.replace(plan, entries=entries)

Inputs = Union[Tensor, Sequence[Tensor]]


@dataclass
class RewriteResult:
    """What one rewrite produced: the model, the plan it carried out, and (optionally) its report.

    ``calibration`` holds the :class:`~dsrewrite.calibrate.CalibrationResult` when
    calibration batches were given.
    """

    model: nn.Module
    plan: Plan
    report: Any = None
    calibration: Any = None


def rewrite_with_plan(
    model: nn.Module,
    plan: Plan,
    example_inputs: Inputs,
    *,
    calibration: Optional[Iterable[Any]] = None,
    calibration_options: Optional[Mapping[str, Any]] = None,
    inplace: bool = False,
    with_report: bool = True,
    benchmark: bool = False,
    task_metric: Optional[TaskMetric] = None,
    share_weights: bool = False,
) -> RewriteResult:
    """Carry out an existing plan, calibrate if batches are given, and build the report.

    ``share_weights=True``: the result holds ``model``'s own tensors for the layers it keeps
    (no copy; ``model`` keeps its modules but shares those tensors, so changing one changes
    both). For callers that drop ``model`` afterwards, as ``dsrewrite apply`` does: the peak
    memory is then the model plus the new blocks, not two models.

    ``task_metric`` (a :class:`~dsrewrite.measure.task.TaskMetric`: a name and ``model -> float`` on the
    user's labelled data) is measured on the original, right after the SVD rewrite and after calibration,
    and reported (``report.task``).

    This is the second half of :func:`rewrite_and_report`, for callers that inspect
    the plan first (the CLI does). ``calibration`` is any iterable of batches as the user has
    them (see :mod:`dsrewrite.batches`; ``calibration_options`` may hold ``input_key`` or
    ``input_fn``); they are turned into model inputs once, read into memory (the labels are
    dropped), and used for the refit and the report's fidelity on the calibration inputs.

    Example:
        >>> from dsrewrite.planner import plan
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3))
        >>> x = torch.randn(1, 3, 16, 16)
        >>> res = rewrite_with_plan(net, plan(net, "all_3x3", x), x, with_report=False)
        >>> type(res.model[1]).__name__
        'DepthwiseSeparableConv2d'
    """
    from .refit.calibrate import check_options

    calib_options = check_options(calibration_options)  # the options first, then the model, as before
    return _carry_out(preflight(model, inplace=inplace), plan, example_inputs, calibration=calibration,
                      calib_options=calib_options, inplace=inplace, with_report=with_report, benchmark=benchmark,
                      task_metric=task_metric, share_weights=share_weights)


def _carry_out(
    pf: Preflight,
    plan: Plan,
    example_inputs: Inputs,
    *,
    calibration: Optional[Iterable[Any]],
    calib_options: dict[str, Any],
    inplace: bool,
    with_report: bool,
    benchmark: bool,
    task_metric: Optional[TaskMetric] = None,
    share_weights: bool = False,
    calib_inputs: Optional[list[Any]] = None,
) -> RewriteResult:
    """:func:`rewrite_with_plan` on a model already through :func:`~dsrewrite.runtime.preflight.preflight`,
    with ``calib_options`` already checked (:func:`~dsrewrite.refit.calibrate.check_options`);
    ``calib_inputs``: calibration batches already turned into model inputs (then ``calibration`` is ignored)."""
    inner, outer = pf.model, pf.wrapper
    plan = _unprefixed(plan, inner)
    calib_batches = calib_inputs
    if calib_batches is None and calibration is not None:  # user batches -> model inputs, once, for calibrate and the report
        from .refit.batches import input_spec, iter_inputs

        spec = input_spec(inner, example_inputs, input_key=calib_options.pop("input_key", None),
                          input_fn=calib_options.pop("input_fn", None), where="calibration")
        calib_batches = list(iter_inputs(calibration, spec))
        if not calib_batches:
            raise UsageError("calibration data gave no batch (an empty list or loader): pass a few batches of "
                             "inputs, or calibration=None for no refit.")
    # The original is needed as the teacher (calibration) and as the reference (report).
    needs_original = inplace and (calib_batches is not None or with_report)
    original = copy.deepcopy(inner) if needs_original or (inplace and task_metric) else inner
    task_original = task_metric(original) if task_metric else None
    rewritten = apply_checked(inner, plan, inplace=inplace, share_weights=share_weights)
    task_svd = task_metric(rewritten) if task_metric else None
    calib_result = None
    if calib_batches:
        from .refit.calibrate import calibrate

        release_free_memory()  # what the load and the rewrite freed (a state dict's heap), before calibration's working set
        calib_result = calibrate(original, rewritten, calib_batches, names=[e.name for e in plan.replaced],
                                 example_inputs=example_inputs, **calib_options)
        release_free_memory()  # what calibration freed, before the report's forward passes (peak memory)
    report = None
    if with_report:
        from .report import build_report

        report = build_report(original, rewritten, plan, example_inputs, calibration_inputs=calib_batches,
                              benchmark=benchmark)
        if calib_result is not None:
            try:
                report.calibration = calib_result
            except AttributeError:  # pragma: no cover - frozen report record
                pass
        if task_metric is not None:
            report.task = TaskScores(task_metric.name, task_original, task_svd,
                                     task_metric(rewritten) if calib_result is not None else None)
    return RewriteResult(model=_rewrap(outer, rewritten, inplace), plan=plan, report=report,
                         calibration=calib_result)


def _run(
    model: nn.Module,
    recipe: RecipeLike,
    example_inputs: Optional[Inputs],
    calibration: Optional[Iterable[Any]],
    calibration_options: Optional[Mapping[str, Any]],
    inplace: bool,
    depth_multiplier: Optional[int],
    order: Optional[str],
    init: Optional[str],
    input_shape: Sequence[int],
    with_report: bool,
    benchmark: bool,
    budget: Any = None,
) -> RewriteResult:
    from .budget.types import parse_budget
    from .refit.calibrate import check_options

    bud = parse_budget(budget)  # the budget first: a malformed one is refused before any work
    if bud is None:
        recipe = load_recipe(recipe)
        bud = recipe.budget  # the recipe's budget: section, if any
    calib_options = check_options(calibration_options)
    pf = preflight(model, inplace=inplace)  # once: unwrap, check, device/dtype, passed down from here
    x = example_inputs if example_inputs is not None else example_input(pf.model, input_shape)
    if bud is None:
        p = plan_checked(pf.model, recipe, x, input_shape=input_shape, depth_multiplier=depth_multiplier,
                         order=order, init=init)
        return _carry_out(pf, p, x, calibration=calibration, calib_options=calib_options,
                          inplace=inplace, with_report=with_report, benchmark=benchmark)
    from .budget.run import budget_inputs, checked_result, plan_for

    inputs = budget_inputs(pf.model, x, calibration, calib_options)
    bp = plan_for(pf.model, recipe, x, bud, inputs, depth_multiplier=depth_multiplier, order=order, init=init)
    res = _carry_out(pf, bp.plan, x, calibration=None, calib_options=calib_options, inplace=inplace,
                     with_report=with_report, benchmark=benchmark, calib_inputs=inputs)
    return checked_result(res, bp, x, dense=None if inplace else pf.model)


def plan_rewrite(
    model: nn.Module,
    recipe: RecipeLike,
    example_inputs: Inputs,
    *,
    input_shape: Optional[Sequence[int]] = None,
    depth_multiplier: Optional[int] = None,
    order: Optional[str] = None,
    init: Optional[str] = None,
    source: str = "the model",
    source_spec: str = "MODEL",
    progress: Optional[Callable[[str], None]] = None,
    must_replace: bool = True,
    budget: Any = None,
    calibration: Optional[Iterable[Any]] = None,
    calibration_options: Optional[Mapping[str, Any]] = None,
) -> Plan:
    """The plan of a rewrite that must replace something: what ``dsrewrite plan``/``apply`` carry out.

    Loads and validates ``recipe`` (a built-in name, a ``.yaml`` path, a mapping), checks the
    model can be rewritten, captures its graph and plans; ``source``/``source_spec`` name the
    model in messages, ``progress`` (if given) hears "capturing the graph ...". ``must_replace=False``
    returns a plan that replaces nothing instead of raising (``dsrewrite plan`` shows its reasons).
    ``budget`` (``{"macs": 5.8e9}``, keys ``macs``, ``params``, ``latency_ms``, ``max_error``; a value ≤ 1 is a fraction of
    the whole model; see docs/budget.md) chooses, per selected conv, dense or a kind and multiplier,
    from the ``calibration`` batches' sensitivity (or a weight-space proxy without them).

    Raises:
        RecipeError: the recipe is not valid.
        UnsupportedModelError: the model cannot be rewritten (quantized convs, meta device).
        UsageError: the recipe selects no conv (the message says how to see why).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 3))
        >>> [e.name for e in plan_rewrite(net, "all_3x3", torch.zeros(1, 16, 16, 16)).replaced]
        ['0', '1']
        >>> plan_rewrite(net, "decoder_only", torch.zeros(1, 16, 16, 16), source="net.pt", source_spec="net.pt")
        Traceback (most recent call last):
        ...
        dsrewrite.errors.UsageError: recipe 'decoder_only' selects no conv of net.pt (2 candidates, all skipped). Hint: `dsrewrite plan net.pt --recipe decoder_only` shows why each was skipped; `dsrewrite inspect` lists the convs.
    """
    rec = load_recipe(recipe)
    check_rewritable(model)
    if budget is not None or rec.budget is not None:
        from .budget.types import parse_budget

        bud = parse_budget(budget) or rec.budget
        if bud is not None:
            from .budget.run import budget_inputs, plan_for
            from .refit.calibrate import check_options

            if progress is not None:
                progress("planning for the budget ...")
            inputs = budget_inputs(model, example_inputs, calibration, check_options(calibration_options))
            return plan_for(model, rec, example_inputs, bud, inputs, depth_multiplier=depth_multiplier,
                            order=order, init=init).plan
    if progress is not None:
        progress("capturing the graph ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingSelectedWarning)
        p = make_plan(model, rec, example_inputs, **({"input_shape": input_shape} if input_shape else {}),
                      depth_multiplier=depth_multiplier, order=order, init=init)
    if not p.replaced and must_replace:
        raise UsageError(
            f"recipe {rec.name!r} selects no conv of {source} ({len(p.entries)} candidates, all "
            f"skipped). Hint: `dsrewrite plan {source_spec} --recipe {recipe}` shows why each was skipped; "
            "`dsrewrite inspect` lists the convs."
        )
    return p


def rewrite(
    model: nn.Module,
    recipe: RecipeLike = "decoder_only",
    *,
    example_inputs: Optional[Inputs] = None,
    calibration: Optional[Iterable[Any]] = None,
    calibration_options: Optional[Mapping[str, Any]] = None,
    inplace: bool = False,
    depth_multiplier: Optional[int] = None,
    order: Optional[str] = None,
    init: Optional[str] = None,
    input_shape: Sequence[int] = (1, 3, 224, 224),
    budget: Optional[Mapping[str, float]] = None,
) -> nn.Module:
    """Swap the convs ``recipe`` selects for depthwise-separable ones; return the model.

    The returned model is the same class as ``model`` with submodules swapped; the
    caller's model is untouched unless ``inplace=True``. An ``nn.DataParallel`` or
    ``DistributedDataParallel`` wrapper is looked through: the plan names the inner
    model's modules (no ``module.`` prefix); a DataParallel comes back around the
    rewritten model, a DDP model comes back unwrapped (wrap it again: DDP binds to
    its parameters when constructed). Quantized convs and models on the meta device
    are refused (:class:`~dsrewrite.errors.UnsupportedModelError`). ``calibration`` (an iterable
    of batches: tensors, ``(image, mask)`` tuples, dicts with ``calibration_options={"input_key": ...}``,
    or anything ``{"input_fn": ...}`` maps; see docs/data.md) refits the new blocks in closed form against the original
    (see :mod:`dsrewrite.calibrate`); ``calibration_options`` are passed on to
    :func:`~dsrewrite.calibrate.calibrate` (e.g. ``{"activation": "none"}`` for a purely
    linear fit). ``depth_multiplier``, ``order`` and ``init``
    override the recipe for every selected conv. ``budget`` (e.g. ``{"macs": 0.5}``; keys ``macs``,
    ``params``, ``latency_ms``, ``max_error``, a value ≤ 1 a fraction of the whole model) lets the planner choose, per
    selected conv, dense or a kind and depth multiplier with the least predicted output error that fits
    (docs/budget.md). To get the plan and the report of the call, use :func:`rewrite_and_report`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3))
        >>> rewrite(net, "all_3x3", example_inputs=torch.randn(1, 3, 16, 16))[1].depthwise.groups
        16
    """
    return _run(
        model, recipe, example_inputs, calibration, calibration_options, inplace, depth_multiplier, order, init,
        input_shape, with_report=False, benchmark=False, budget=budget,
    ).model


def rewrite_and_report(
    model: nn.Module,
    recipe: RecipeLike = "decoder_only",
    *,
    example_inputs: Optional[Inputs] = None,
    calibration: Optional[Iterable[Any]] = None,
    calibration_options: Optional[Mapping[str, Any]] = None,
    inplace: bool = False,
    depth_multiplier: Optional[int] = None,
    order: Optional[str] = None,
    init: Optional[str] = None,
    input_shape: Sequence[int] = (1, 3, 224, 224),
    benchmark: bool = False,
    budget: Optional[Mapping[str, float]] = None,
) -> RewriteResult:
    """Like :func:`rewrite`, returning a :class:`RewriteResult` with the plan and the report.

    ``benchmark=True`` adds measured latency (interleaved runs, medians) to the report. With a
    ``budget``, the plan's notes also give the MACs counted on the result and the output error
    measured after calibration next to the predicted one.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3))
        >>> res = rewrite_and_report(net, "all_3x3", example_inputs=torch.randn(1, 3, 16, 16))
        >>> [e.name for e in res.plan.replaced]
        ['1']
    """
    return _run(
        model, recipe, example_inputs, calibration, calibration_options, inplace, depth_multiplier, order, init,
        input_shape, with_report=True, benchmark=benchmark, budget=budget,
    )
