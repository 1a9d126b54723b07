# SPDX-License-Identifier: Apache-2.0
"""How close a rewritten model's outputs are to the original's: relative L2, cosine, argmax agreement.

Outputs may be tensors or any nesting of tuples, lists and dicts of tensors
(torchvision segmentation models return ``{"out": ..., "aux": ...}``). They are
flattened in a defined order (sequences by position, dicts by sorted key) and
compared leaf by leaf, in float64:

* relative L2 error ``‖a − b‖ / ‖a‖`` (``a``: original);
* cosine similarity of the flattened outputs;
* for dense-prediction leaves ``(N, C > 1, H, W)``: the share of pixels whose
  argmax over ``C`` agrees (``None`` when no leaf has that shape);
* the largest absolute difference.

Over several batches the sums are accumulated before dividing (sum of squared
errors / sum of squared norms), never averaged per batch. Both models run in
eval mode under ``no_grad``; their train flags are restored afterwards.

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
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ..errors import RewriteError
from ..runtime.run import describe_inputs, evaluating, flatten_outputs, run_model

__all__ = ["Fidelity", "OutputFidelity", "FidelityError", "compare_outputs"]


class FidelityError(RewriteError):
    """The two models' outputs cannot be compared (different structure or shapes)."""


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
    """Agreement of two models over all output leaves and batches (see module docstring)."""

    rel_l2: float
    cosine: float
    max_abs: float
    argmax_agreement: Optional[float]
    batches: int
    outputs: tuple[OutputFidelity, ...]

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
        if a.dim() == 4 and a.shape[1] > 1:
            self.agree += int((a64.argmax(1) == b64.argmax(1)).sum())
            self.pixels += a.shape[0] * a.shape[2] * a.shape[3]


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


def compare_outputs(
    original: nn.Module,
    rewritten: nn.Module,
    inputs: Union[Tensor, Iterable[Any]],
) -> Fidelity:
    """Compare the outputs of ``rewritten`` with those of ``original`` on one or more batches.

    ``inputs`` is one batch (a tensor) or an iterable of batches; a batch that
    is a tuple/list is passed as positional arguments, a dict as keyword arguments.

    Raises:
        FidelityError: the outputs differ in structure or shape, or no batch was given.

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
    batches = 0
    with evaluating(original, rewritten), torch.no_grad():
        for batch in _batches(inputs):
            leaves_a = flatten_outputs(run_model(original, batch))
            leaves_b = flatten_outputs(run_model(rewritten, batch))
            paths_a, paths_b = [p for p, _ in leaves_a], [p for p, _ in leaves_b]
            if paths_a != paths_b:
                raise FidelityError(
                    f"outputs differ in structure on input {describe_inputs(batch)}: original gives "
                    f"{paths_a or 'no tensors'}, rewritten gives {paths_b or 'no tensors'}. "
                    "Hint: a rewrite must keep the model's output structure; compare the right models."
                )
            for (path, a), (_, b) in zip(leaves_a, leaves_b):
                if a.shape != b.shape:
                    raise FidelityError(
                        f"output {path or '<tensor>'!r} has shape {tuple(a.shape)} in the original but "
                        f"{tuple(b.shape)} in the rewritten model on input {describe_inputs(batch)}. "
                        "Hint: a rewrite must keep output shapes; check the replaced layers' stride/padding."
                    )
                acc = accs.setdefault(path, _Acc(tuple(a.shape)))
                acc.add(a, b)
            batches += 1
    if batches == 0:
        raise FidelityError("no input batch to compare on: `inputs` was empty. Hint: pass at least one batch.")
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
        rel_l2=_rel(sum(a.sq_err for a in vals), sum(a.sq_a for a in vals)),
        cosine=_cos(sum(a.dot for a in vals), sum(a.sq_a for a in vals), sum(a.sq_b for a in vals)),
        max_abs=max((a.max_abs for a in vals), default=0.0),
        argmax_agreement=sum(a.agree for a in vals) / pixels if pixels else None,
        batches=batches,
        outputs=outputs,
    )
