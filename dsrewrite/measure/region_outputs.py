# SPDX-License-Identifier: Apache-2.0
"""When a model's outputs cannot be compared, compare the outputs of the modules around the replaced convs.

Detectors in eval mode return post-processed boxes whose count depends on the scores
(torchvision's Faster R-CNN, RetinaNet): a rewrite that moves the scores a little
changes the number of boxes, and the outputs no longer pair up. What the rewrite
changed can still be measured where the tensors have fixed shapes: the outputs of the
modules that hold the replaced convs (the FPN's feature maps, the head's raw logits).

:func:`region_outputs` hooks, for every replaced conv, the conv itself and each of its
ancestors (not the model itself), runs both models once on the batch, and picks for
each replaced conv the **outermost** ancestor whose outputs pair up completely
(:func:`~dsrewrite.measure.compare.pair_outputs`: same structure, equal shapes, at
least one tensor); the conv itself is the last resort. A module chosen for one conv that
lies inside a module chosen for another is dropped. The first batch decides; later
batches compare the same modules.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Top(nn.Module):  # a model whose output is a variable-length selection
    ...     def __init__(self, scale=1.0):
    ...         super().__init__()
    ...         self.head = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Identity())
    ...         self.scale = scale
    ...     def forward(self, x):
    ...         y = self.head(x) * self.scale
    ...         return y[y > 0]
    >>> x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    >>> chosen, a, b = region_outputs(Top(), Top(), x, ["head.0"])
    >>> chosen, [len(v) for v in a.values()]
    (['head'], [1])
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

from torch import nn

from ..runtime.run import call_model
from .compare import pair_outputs

__all__ = ["candidate_modules", "region_outputs", "record_outputs"]


def candidate_modules(model: nn.Module, replaced: Iterable[str]) -> dict[str, list[str]]:
    """For each replaced conv, its ancestors from the outermost down to the conv itself (names the model has)."""
    names = dict(model.named_modules())
    out: dict[str, list[str]] = {}
    for conv in replaced:
        parts = conv.split(".")
        chain = [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
        out[conv] = [n for n in chain if n in names]
    return out


def record_outputs(model: nn.Module, batch: Any, names: Iterable[str]) -> dict[str, list[Any]]:
    """Run ``model`` on ``batch`` (already in eval mode, ``no_grad``) and return each named module's outputs, per call."""
    seen: dict[str, list[Any]] = {n: [] for n in names}
    handles = []

    def keep(name: str) -> Any:
        def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
            seen[name].append(out)
        return hook

    try:
        for n in seen:
            handles.append(model.get_submodule(n).register_forward_hook(keep(n)))
        call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def _comparable(a: list[Any], b: list[Any]) -> bool:
    if not a or len(a) != len(b):
        return False
    pairings = [pair_outputs(x, y) for x, y in zip(a, b)]
    return all(not p.mismatch and p.pairs for p in pairings)


def region_outputs(original: nn.Module, rewritten: nn.Module, batch: Any, replaced: Sequence[str],
                   chosen: Optional[list[str]] = None) -> tuple[list[str], dict[str, list[Any]], dict[str, list[Any]]]:
    """The modules to compare (``chosen``, or picked as the module docstring says) and their outputs in both models.

    Both models must already be in eval mode under ``no_grad``.
    """
    if chosen is None:
        chains = candidate_modules(original, replaced)
        names = sorted({n for chain in chains.values() for n in chain})
    else:
        names = list(chosen)
    a = record_outputs(original, batch, names)
    b = record_outputs(rewritten, batch, names)
    if chosen is None:
        picks = []
        for chain in chains.values():
            pick = next((n for n in chain if _comparable(a[n], b[n])), None)
            if pick is not None:
                picks.append(pick)
        picks = sorted(set(picks))
        chosen = [n for n in picks if not any(n.startswith(o + ".") for o in picks if o != n)]
    return chosen, {n: a[n] for n in chosen}, {n: b[n] for n in chosen}
