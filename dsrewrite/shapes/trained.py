# SPDX-License-Identifier: Apache-2.0
"""The shipped, trained demo U-Net and its held-out data.

``bench/train_demo.py`` trains :class:`~dsrewrite.shapes.unet.ShapesUnet` on generated
shapes (:func:`~dsrewrite.shapes.data.make_shapes`, 64×64, seeded, one thread,
deterministic algorithms) and writes ``shapes_unet.safetensors`` beside this file: the
same bytes on every run on the same torch build. Loading it runs no code (safetensors).

Example:
    >>> m = trained_unet()
    >>> x, y = held_out(8)
    >>> 0.0 <= evaluate_miou(m, x, y) <= 1.0
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data import NUM_CLASSES, confusion, make_shapes, miou
from .unet import ShapesUnet

__all__ = ["WEIGHTS", "TRAIN_CONFIG", "trained_unet", "held_out", "calibration_images", "evaluate_miou",
           "demo_task_metric"]

WEIGHTS = Path(__file__).resolve().parent / "shapes_unet.safetensors"
#: How the shipped weights were trained (bench/train_demo.py); seeds give the data splits.
TRAIN_CONFIG: dict[str, Any] = {
    "size": 64, "train_images": 4096, "test_images": 512, "steps": 800, "batch": 32, "lr": 3e-3,
    "weight_decay": 1e-4, "seed": 0, "init_seed": 1, "widths": [16, 32, 64, 128], "decoder": [64, 32, 16],
    "version": 1,
}
_TRAIN_SEED, _TEST_SEED, _CALIB_SEED = 1, 2, 3


def trained_unet() -> nn.Module:
    """The trained demo U-Net in eval mode (weights from ``shapes_unet.safetensors``).

    Raises:
        FileNotFoundError: the weights file is missing (run ``python bench/train_demo.py``).
    """
    import safetensors.torch

    model = ShapesUnet(TRAIN_CONFIG["widths"], TRAIN_CONFIG["decoder"])
    model.load_state_dict(safetensors.torch.load_file(str(WEIGHTS)), strict=True)
    return model.eval()


def training_set() -> tuple[Tensor, Tensor]:
    """The generated training images ``(N, 3, 64, 64)`` and labels ``(N, 64, 64)``."""
    c = TRAIN_CONFIG
    return make_shapes(c["train_images"], size=c["size"], seed=c["seed"] * 1000 + _TRAIN_SEED)


def held_out(n: int = TRAIN_CONFIG["test_images"], size: int = TRAIN_CONFIG["size"]) -> tuple[Tensor, Tensor]:
    """The held-out evaluation images and labels (never trained on); the first ``n`` of 512 at 64×64."""
    return make_shapes(n, size=size, seed=TRAIN_CONFIG["seed"] * 1000 + _TEST_SEED)


def calibration_images(n: int, size: int = TRAIN_CONFIG["size"]) -> Tensor:
    """``n`` unlabeled images for calibration and healing, from a seed used for neither split."""
    return make_shapes(n, size=size, seed=TRAIN_CONFIG["seed"] * 1000 + _CALIB_SEED)[0]


@torch.no_grad()
def evaluate_miou(model: nn.Module, x: Tensor, y: Tensor, batch: int = 64) -> float:
    """mIoU in [0, 1] of ``model`` on images ``x`` ``(N, 3, H, W)`` with labels ``y`` ``(N, H, W)``.

    The model is run in eval mode; its train/eval flag is restored.
    """
    was = model.training
    model.eval()
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    try:
        for i in range(0, len(x), batch):
            conf += confusion(model(x[i : i + batch]).argmax(1), y[i : i + batch])
    finally:
        model.train(was)
    return miou(conf)


def demo_task_metric() -> Any:
    """The demo's task metric: mIoU (%) on the 512 held-out images (a :class:`~dsrewrite.measure.task.TaskMetric`)."""
    from ..measure.task import TaskMetric

    x, y = held_out()
    return TaskMetric(f"mIoU (%) on {len(x)} held-out shapes images {x.shape[-2]}×{x.shape[-1]}",
                      lambda m: 100.0 * evaluate_miou(m, x, y))
