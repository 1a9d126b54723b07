# SPDX-License-Identifier: Apache-2.0
"""The demo's world: generated shapes data, the small U-Net trained on it, and its mIoU.

Example:
    >>> from dsrewrite.shapes import make_shapes, CLASSES
    >>> make_shapes(2, size=16, seed=0)[0].shape, CLASSES[1]
    (torch.Size([2, 3, 16, 16]), 'circle')
"""

from .data import CLASSES, NUM_CLASSES, confusion, make_shapes, miou
from .trained import (
    TRAIN_CONFIG,
    WEIGHTS,
    calibration_images,
    demo_task_metric,
    evaluate_miou,
    held_out,
    trained_unet,
)
from .unet import ShapesUnet

__all__ = [
    "CLASSES", "NUM_CLASSES", "confusion", "make_shapes", "miou", "ShapesUnet", "TRAIN_CONFIG", "WEIGHTS",
    "calibration_images", "demo_task_metric", "evaluate_miou", "held_out", "trained_unet",
]
