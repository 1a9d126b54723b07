# SPDX-License-Identifier: Apache-2.0
"""A task metric (mIoU, accuracy, ...) measured on the original, after SVD and after calibration.

Fidelity (:mod:`dsrewrite.measure.fidelity`) says how far the outputs moved; a task metric says
what that costs the user's task. It needs labels, so it is the caller's: a name and a function
from a model to a number (higher is better), evaluated with the model in eval mode.

Example:
    >>> import torch
    >>> from torch import nn
    >>> metric = TaskMetric("sum of outputs", lambda m: float(m(torch.ones(1, 2)).sum()))
    >>> scores = TaskScores(metric.name, original=metric(nn.Linear(2, 1)))
    >>> scores.to_dict()["name"]
    'sum of outputs'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

__all__ = ["TaskMetric", "TaskScores"]


@dataclass(frozen=True)
class TaskMetric:
    """``name`` (shown in the report, with its unit) and ``evaluate(model) -> float`` (higher is better)."""

    name: str
    evaluate: Callable[[nn.Module], float]

    def __call__(self, model: nn.Module) -> float:
        """``evaluate`` on ``model`` in eval mode without gradients; the train/eval flag is restored."""
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return float(self.evaluate(model))
        finally:
            model.train(was)


@dataclass(frozen=True)
class TaskScores:
    """The metric on the original, right after the SVD rewrite, after calibration (``None``: not run)."""

    name: str
    original: float
    svd: Optional[float] = None
    calibrated: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "original": self.original, "svd": self.svd, "calibrated": self.calibrated}
