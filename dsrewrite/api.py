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
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .apply import apply_plan
from .planner import RecipeLike, plan as make_plan
from .plan_types import Plan

__all__ = ["rewrite", "rewrite_and_report", "rewrite_with_plan", "RewriteResult", "example_input"]

Inputs = Union[Tensor, Sequence[Tensor]]


def example_input(model: nn.Module, input_shape: Sequence[int] = (1, 3, 224, 224), *, seed: int = 0) -> Tensor:
    """A seeded standard-normal input on the model's device and floating dtype.

    Example:
        >>> example_input(nn.Conv2d(3, 8, 3), (1, 3, 8, 8)).shape
        torch.Size([1, 3, 8, 8])
    """
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None and p.device.type != "meta" else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(int(s) for s in input_shape), generator=g).to(device=device, dtype=dtype)


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
    calibration: Optional[Iterable[Tensor]] = None,
    inplace: bool = False,
    with_report: bool = True,
    benchmark: bool = False,
) -> RewriteResult:
    """Carry out an existing plan, calibrate if batches are given, and build the report.

    This is the second half of :func:`rewrite_and_report`, for callers that inspect
    the plan first (the CLI does).

    Example:
        >>> from dsrewrite.planner import plan
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3))
        >>> x = torch.randn(1, 3, 16, 16)
        >>> res = rewrite_with_plan(net, plan(net, "all_3x3", x), x, with_report=False)
        >>> type(res.model[1]).__name__
        'DepthwiseSeparableConv2d'
    """
    calib_batches = list(calibration) if calibration is not None else None
    # The original is needed as the teacher (calibration) and as the reference (report).
    needs_original = inplace and (calib_batches is not None or with_report)
    original = copy.deepcopy(model) if needs_original else model
    rewritten = apply_plan(model, plan, inplace=inplace)
    calib_result = None
    if calib_batches:
        from .calibrate import calibrate

        calib_result = calibrate(original, rewritten, calib_batches, names=[e.name for e in plan.replaced])
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
    return RewriteResult(model=rewritten, plan=plan, report=report, calibration=calib_result)


def _run(
    model: nn.Module,
    recipe: RecipeLike,
    example_inputs: Optional[Inputs],
    calibration: Optional[Iterable[Tensor]],
    inplace: bool,
    depth_multiplier: Optional[int],
    order: Optional[str],
    init: Optional[str],
    input_shape: Sequence[int],
    with_report: bool,
    benchmark: bool,
) -> RewriteResult:
    x = example_inputs if example_inputs is not None else example_input(model, input_shape)
    p = make_plan(model, recipe, x, input_shape=input_shape, depth_multiplier=depth_multiplier, order=order, init=init)
    return rewrite_with_plan(model, p, x, calibration=calibration, inplace=inplace, with_report=with_report,
                             benchmark=benchmark)


def rewrite(
    model: nn.Module,
    recipe: RecipeLike = "decoder_only",
    *,
    example_inputs: Optional[Inputs] = None,
    calibration: Optional[Iterable[Tensor]] = None,
    inplace: bool = False,
    depth_multiplier: Optional[int] = None,
    order: Optional[str] = None,
    init: Optional[str] = None,
    input_shape: Sequence[int] = (1, 3, 224, 224),
) -> nn.Module:
    """Swap the convs ``recipe`` selects for depthwise-separable ones; return the model.

    The returned model is the same class as ``model`` with submodules swapped; the
    caller's model is untouched unless ``inplace=True``. ``calibration`` (an iterable
    of example inputs) refits the new blocks in closed form against the original
    (see :mod:`dsrewrite.calibrate`). ``depth_multiplier``, ``order`` and ``init``
    override the recipe for every selected conv. To get the plan and the report of
    the call, use :func:`rewrite_and_report`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3))
        >>> rewrite(net, "all_3x3", example_inputs=torch.randn(1, 3, 16, 16))[1].depthwise.groups
        16
    """
    return _run(
        model, recipe, example_inputs, calibration, inplace, depth_multiplier, order, init,
        input_shape, with_report=False, benchmark=False,
    ).model


def rewrite_and_report(
    model: nn.Module,
    recipe: RecipeLike = "decoder_only",
    *,
    example_inputs: Optional[Inputs] = None,
    calibration: Optional[Iterable[Tensor]] = None,
    inplace: bool = False,
    depth_multiplier: Optional[int] = None,
    order: Optional[str] = None,
    init: Optional[str] = None,
    input_shape: Sequence[int] = (1, 3, 224, 224),
    benchmark: bool = False,
) -> RewriteResult:
    """Like :func:`rewrite`, returning a :class:`RewriteResult` with the plan and the report.

    ``benchmark=True`` adds measured latency (interleaved runs, medians) to the report.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3))
        >>> res = rewrite_and_report(net, "all_3x3", example_inputs=torch.randn(1, 3, 16, 16))
        >>> [e.name for e in res.plan.replaced]
        ['1']
    """
    return _run(
        model, recipe, example_inputs, calibration, inplace, depth_multiplier, order, init,
        input_shape, with_report=True, benchmark=benchmark,
    )
