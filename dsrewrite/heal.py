# SPDX-License-Identifier: Apache-2.0
"""Moved to :mod:`dsrewrite.refit.heal`; this path re-exports it for one minor version."""

from __future__ import annotations

from .refit.heal import (
    heal,
    HealResult,
    init_distributed,
    TRAINABLE,
    SCHEDULES,
    OUTPUT_LOSSES,
    CHECKPOINT_FORMAT,
)
from ._shim import make_callable

make_callable(__name__, heal)  # dsrewrite.heal(...) keeps calling the function

__all__ = [
    "heal",
    "HealResult",
    "init_distributed",
    "TRAINABLE",
    "SCHEDULES",
    "OUTPUT_LOSSES",
    "CHECKPOINT_FORMAT",
]

if __name__ == "__main__":  # pragma: no cover - the old torchrun line, refused with the new one
    raise SystemExit("`python -m dsrewrite.heal` moved: run `python -m dsrewrite heal ...` "
                     "(torchrun --nproc_per_node=N --standalone -m dsrewrite heal MODEL --rewritten R --data D -o OUT).")
