# SPDX-License-Identifier: Apache-2.0
"""The fixed option values of healing and of the calibration data, importable without torch.

The command line lists them in ``--help`` (which must not import torch); the functions
that use them validate against the same tuples.

Example:
    >>> SCHEDULES, TRAINABLE, OUTPUT_LOSSES, tuple(PRESETS)
    (('constant', 'cosine', 'linear'), ('all', 'replaced'), ('mse', 'kl'), ('imagenet', 'none'))
"""

from __future__ import annotations

from typing import Optional

__all__ = ["SCHEDULES", "TRAINABLE", "OUTPUT_LOSSES", "PRESETS"]

#: Learning-rate schedules of :func:`~dsrewrite.refit.heal.heal` (:mod:`~dsrewrite.refit.schedule`).
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear")
#: Which parameters :func:`~dsrewrite.refit.heal.heal` trains.
TRAINABLE: tuple[str, ...] = ("all", "replaced")
#: The output term of the healing loss.
OUTPUT_LOSSES: tuple[str, ...] = ("mse", "kl")
#: Normalisation presets of calibration/healing images: (mean, std) per channel, or None.
PRESETS: dict[str, Optional[tuple[tuple[float, ...], tuple[float, ...]]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": None,
}
