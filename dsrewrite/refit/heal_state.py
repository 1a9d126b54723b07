# SPDX-License-Identifier: Apache-2.0
"""Heal checkpoints: everything a killed run needs to continue as if it had never stopped.

A checkpoint (``torch.save`` of plain containers and tensors, read back weights-only) holds
the format tag, the step, the model, optimizer and learning-rate scheduler states, the
random number generator states (torch CPU, every CUDA device, Python's ``random``), the data
position (global batches consumed, and the next batch's epoch and index) and the loss history.
It is written atomically: a reader sees the previous checkpoint or the new one, never a part.

Resuming on CPU with the same data, options and thread count gives bitwise the weights of an
uninterrupted run. Under ``torchrun`` rank 0 writes its own RNG states; every rank restores them.

Example:
    >>> import tempfile, torch
    >>> p = Path(tempfile.mkdtemp()) / "ck.pt"
    >>> save_checkpoint(p, {"step": 3, "model": {"w": torch.ones(1)}})
    >>> load_checkpoint(p)["step"]
    3
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from ..runtime.files import atomic_save
from .results import CalibrationUsageError

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "rng_states", "restore_rng_states"]

CHECKPOINT_FORMAT = "dsrewrite-heal-v2"


def rng_states() -> dict[str, Any]:
    """The generators' states: torch CPU, each CUDA device (when CUDA is up), Python ``random``."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the generators to what :func:`rng_states` recorded (CUDA only where both have it)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "python" in states:
        py = states["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in states and torch.cuda.is_available():
        cuda = list(states["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (with the format tag) to ``path`` atomically, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"format": CHECKPOINT_FORMAT, **payload}, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (weights-only).

    Raises:
        CalibrationUsageError: the file is missing, unreadable, or not a heal checkpoint of this format.
    """
    if not path.is_file():
        raise CalibrationUsageError(
            f"heal(resume=True): checkpoint {str(path)!r} does not exist. "
            "Hint: run once without resume to create it, or check the path."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any unreadable file the same way
        raise CalibrationUsageError(
            f"heal(resume=True): cannot read checkpoint {str(path)!r}: {type(exc).__name__}: {exc}. "
            "Hint: pass a checkpoint written by dsrewrite heal."
        ) from exc
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != CHECKPOINT_FORMAT:
        older = isinstance(fmt, str) and fmt.startswith("dsrewrite-heal-")
        raise CalibrationUsageError(
            f"heal(resume=True): {str(path)!r} is not a {CHECKPOINT_FORMAT} checkpoint"
            + (f" (it is {fmt}, written by an older dsrewrite without the scheduler, RNG and data position)"
               if older else "") + ". Hint: pass a checkpoint written by this version's dsrewrite heal."
        )
    return ckpt
