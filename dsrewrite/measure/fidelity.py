# SPDX-License-Identifier: Apache-2.0
"""How close a rewritten model's outputs are to the original's: relative L2, cosine, argmax agreement.

Outputs may be tensors or any nesting of tuples, lists, dicts and dataclasses
(torchvision segmentation models return ``{"out": ..., "aux": ...}``). They are
paired leaf by leaf in the model's order (:mod:`dsrewrite.measure.compare`: sequences
by position, dicts by key, dataclasses by field); tensors of equal shape are compared,
in float64:

* relative L2 error ``‖a − b‖ / ‖a‖`` (``a``: original);
* cosine similarity of the flattened outputs;
* for dense-prediction leaves ``(N, C > 1, H, W)`` and volumes ``(N, C > 1, D, H, W)``:
  the share of pixels (voxels) whose argmax over ``C`` agrees (``None`` when no leaf
  has such a shape);
* the largest absolute difference.

Over several batches the sums are accumulated before dividing (sum of squared
errors / sum of squared norms), never averaged per batch. Both models run in
eval mode under ``no_grad``; their train flags are restored afterwards.

What cannot be compared (``None``, strings, tensors whose shapes differ) is listed in
:attr:`Fidelity.not_compared` with the reason, never counted as a perfect match; when
nothing was compared the metrics are ``None``. When no output leaf can be compared
(variable-length or empty detections, ``None``) and the names of the replaced convs are
given, the outputs of the modules around them are compared instead
(:mod:`dsrewrite.measure.region_outputs`) and :attr:`Fidelity.compared` says so.

Example:
    >>> import torch
    >>> from torch import nn
    >>> a = nn.Conv2d(3, 4, 3)
    >>> fid = compare_outputs(a, a, torch.randn(2, 3, 8, 8))
    >>> fid.rel_l2, fid.cosine, fid.argmax_agreement
    (0.0, 1.0, 1.0)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import RewriteError
from ..runtime.run import evaluating, run_model
from .compare import NotCompared, pair_outputs
from .region_outputs import region_outputs

__all__ = ["Fidelity", "OutputFidelity", "FidelityError", "NotCompared", "compare_outputs"]


class FidelityError(RewriteError):
    """There is nothing to compare the two models on (no input batch)."""


@dataclass(frozen=True)
class OutputFidelity:
    """One output leaf: ``path`` names it (``'out'``, ``'[0]'``, ``'[1].logits'``; ``''`` for a bare tensor)."""

    path: str
    shape: tuple[int, ...]
    rel_l2: float
    cosine: float
    max_abs: float
    argmax_agreement: Optional[float]


@dataclass(frozen=True)
class Fidelity:
    """Agreement of two models over all compared leaves and batches (see module docstring).

    ``rel_l2``, ``cosine`` and ``max_abs`` are ``None`` when no leaf could be compared.
    ``compared`` is ``"outputs"`` (the models' outputs) or ``"regions"`` (the outputs of
    the modules named in ``regions``, because no output leaf of the models could be compared);
    ``not_compared`` lists the model output leaves that were not compared, and why.
    """

    rel_l2: Optional[float]
    cosine: Optional[float]
    max_abs: Optional[float]
    argmax_agreement: Optional[float]
    batches: int
    outputs: tuple[OutputFidelity, ...]
    compared: str = "outputs"
    regions: tuple[str, ...] = ()
    not_compared: tuple[NotCompared, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (shapes as lists)."""
        d = asdict(self)
        for o in d["outputs"]:
            o["shape"] = list(o["shape"])
        return d


class _Acc:
    """Running sums for one leaf (float64)."""

    __slots__ = ("shape", "sq_err", "sq_a", "sq_b", "dot", "max_abs", "agree", "pixels")

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.sq_err = self.sq_a = self.sq_b = self.dot = self.max_abs = 0.0
        self.agree = self.pixels = 0

    def add(self, a: Tensor, b: Tensor) -> None:
        a64 = a.detach().to(torch.float64)
        b64 = b.detach().to(a.device, torch.float64)
        diff = a64 - b64
        self.sq_err += float((diff * diff).sum())
        self.sq_a += float((a64 * a64).sum())
        self.sq_b += float((b64 * b64).sum())
        self.dot += float((a64 * b64).sum())
        if diff.numel():
            self.max_abs = max(self.max_abs, float(diff.abs().max()))
        if a.dim() in (4, 5) and a.shape[1] > 1:  # 2-D maps and 3-D volumes (MONAI's U-Nets)
            self.agree += int((a64.argmax(1) == b64.argmax(1)).sum())
            self.pixels += a.numel() // a.shape[1]


def _rel(sq_err: float, sq_a: float) -> float:
    if sq_a == 0.0:
        return 0.0 if sq_err == 0.0 else math.inf
    return math.sqrt(sq_err / sq_a)


def _cos(dot: float, sq_a: float, sq_b: float) -> float:
    if sq_a == 0.0 or sq_b == 0.0:  # a zero output: similar only to another zero output
        return 1.0 if sq_a == sq_b else 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(sq_a * sq_b)))


def _batches(inputs: Union[Tensor, Iterable[Any]]) -> Iterable[Any]:
    if isinstance(inputs, (Tensor, Mapping)):
        return [inputs]
    return inputs


def _accumulate(accs: dict[str, _Acc], pairs: Iterable[tuple[str, Tensor, Tensor]]) -> None:
    for path, a, b in pairs:
        accs.setdefault(path, _Acc(tuple(a.shape))).add(a, b)


def _regions(original: nn.Module, rewritten: nn.Module, batches: list[Any], replaced: Sequence[str],
             accs: dict[str, _Acc]) -> list[str]:
    """Compare the outputs of the modules around the replaced convs (see :mod:`.region_outputs`)."""
    chosen: Optional[list[str]] = None
    for batch in batches:
        chosen, outs_a, outs_b = region_outputs(original, rewritten, batch, replaced, chosen)
        for name in chosen:
            calls = list(zip(outs_a[name], outs_b[name]))
            for i, (a, b) in enumerate(calls):
                prefix = name if len(calls) == 1 else f"{name}#{i}"
                pairing = pair_outputs(a, b)
                _accumulate(accs, ((f"{prefix}:{p}" if p else prefix, x, y) for p, x, y in pairing.pairs))
        if not chosen:
            break
    return chosen or []


def compare_outputs(
    original: nn.Module,
    rewritten: nn.Module,
    inputs: Union[Tensor, Iterable[Any]],
    *,
    replaced: Sequence[str] = (),
) -> Fidelity:
    """Compare the outputs of ``rewritten`` with those of ``original`` on one or more batches.

    ``inputs`` is one batch (a tensor) or an iterable of batches; a batch that
    is a tuple/list is passed as positional arguments, a dict as keyword arguments.
    ``replaced`` (the replaced convs' names) lets the comparison fall back to the
    outputs of the modules around them when no output leaf can be compared.

    Raises:
        FidelityError: no batch was given.

    Example:
        >>> from dsrewrite.layers import DepthwiseSeparableConv2d
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> dense = nn.Conv2d(8, 8, 3, padding=1)
        >>> batches = [torch.randn(2, 8, 6, 6) for _ in range(3)]
        >>> compare_outputs(dense, DepthwiseSeparableConv2d.from_conv(dense, depth_multiplier=9), batches).rel_l2 < 1e-5
        True
        >>> compare_outputs(dense, DepthwiseSeparableConv2d.from_conv(dense, depth_multiplier=1), batches).rel_l2 > 0
        True
    """
    accs: dict[str, _Acc] = {}
    skipped: dict[str, NotCompared] = {}
    kept: list[Any] = []
    with evaluating(original, rewritten), torch.no_grad():
        for batch in _batches(inputs):
            pairing = pair_outputs(run_model(original, batch), run_model(rewritten, batch))
            _accumulate(accs, pairing.pairs)
            for n in pairing.not_compared:
                skipped.setdefault(n.path, n)
            kept.append(batch)
        if not kept:
            raise FidelityError("no input batch to compare on: `inputs` was empty. Hint: pass at least one batch.")
        regions: list[str] = []
        if not accs and replaced:
            region_accs: dict[str, _Acc] = {}
            regions = _regions(original, rewritten, kept, replaced, region_accs)
            if regions:
                accs = region_accs
    return _summary(accs, len(kept), tuple(skipped.values()), regions)


def _summary(accs: dict[str, _Acc], batches: int, not_compared: tuple[NotCompared, ...],
             regions: list[str]) -> Fidelity:
    outputs = tuple(
        OutputFidelity(
            path=p,
            shape=acc.shape,
            rel_l2=_rel(acc.sq_err, acc.sq_a),
            cosine=_cos(acc.dot, acc.sq_a, acc.sq_b),
            max_abs=acc.max_abs,
            argmax_agreement=acc.agree / acc.pixels if acc.pixels else None,
        )
        for p, acc in accs.items()
    )
    vals = list(accs.values())
    pixels = sum(a.pixels for a in vals)
    return Fidelity(
        rel_l2=_rel(sum(a.sq_err for a in vals), sum(a.sq_a for a in vals)) if vals else None,
        cosine=_cos(sum(a.dot for a in vals), sum(a.sq_a for a in vals), sum(a.sq_b for a in vals)) if vals else None,
        max_abs=max(a.max_abs for a in vals) if vals else None,
        argmax_agreement=sum(a.agree for a in vals) / pixels if pixels else None,
        batches=batches,
        outputs=outputs,
        compared="regions" if regions else "outputs",
        regions=tuple(regions),
        not_compared=not_compared,
    )
