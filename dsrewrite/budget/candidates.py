# SPDX-License-Identifier: Apache-2.0
"""What each selected conv may become: keep it dense, or a registered kind at a depth multiplier.

For every conv the recipe selects, the candidates are: ``dense`` (kept as it is), and each
kind that may replace it × every depth multiplier ``m = 1 .. kh·kw`` (at ``m = kh·kw`` a linear
block represents any kernel exactly). The kinds are the recipe's own for that conv, or every
kind that takes part in ``order: auto`` when the recipe (or ``--order``) says ``auto``; a kind
that refuses the conv (:meth:`~dsrewrite.kinds.ReplacementKind.check`) is left out. Costs are
asked of the kind (:meth:`~dsrewrite.kinds.ReplacementKind.macs`/``params``) at the shapes the
capture recorded; the dense costs are the ones :mod:`dsrewrite.measure.macs` counts. A candidate
that costs at least as many MACs as the dense conv is dropped (dense has no error).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dsrewrite.planning.capture import capture
    >>> conv = nn.Conv2d(16, 32, 3, padding=1)
    >>> fact = capture(nn.Sequential(conv), torch.zeros(1, 16, 8, 8)).facts[0]
    >>> lc = layer_candidates(fact, conv, ("dw_pw",), dense_macs=294912)
    >>> [c.label for c in lc.candidates][:3], lc.candidates[1].macs
    (['dense', 'dw_pw m=1', 'dw_pw m=2'], 41984)
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Optional, Sequence

from torch import nn

from ..errors import UnsupportedConvError
from ..facts import ConvFact
from ..kinds import get_kind

__all__ = ["Candidate", "LayerCandidates", "layer_candidates", "dense_params"]


@dataclass(frozen=True)
class Candidate:
    """One option for one conv: ``kind is None`` keeps it dense (``m == 0``). MACs/params of the block."""

    kind: Optional[str]
    m: int
    macs: int
    params: int

    @property
    def dense(self) -> bool:
        return self.kind is None

    @property
    def label(self) -> str:
        return "dense" if self.kind is None else f"{self.kind} m={self.m}"


@dataclass(frozen=True)
class LayerCandidates:
    """The candidates of one conv; ``candidates[0]`` is always ``dense``. ``refused`` says which kinds declined."""

    name: str
    fact: ConvFact
    candidates: tuple[Candidate, ...]
    refused: tuple[str, ...] = ()

    @property
    def kernel_area(self) -> int:
        return prod(int(k) for k in self.fact.kernel_size)

    def cost(self, key: str) -> list[int]:
        """Each candidate's ``macs`` or ``params``."""
        return [getattr(c, key) for c in self.candidates]


def dense_params(conv: nn.Module) -> int:
    """Parameters of the dense conv (weight and bias)."""
    return sum(int(p.numel()) for p in conv.parameters(recurse=False))


def layer_candidates(fact: ConvFact, conv: nn.Module, kinds: Sequence[str], *, dense_macs: int,
                     max_m: Optional[int] = None) -> LayerCandidates:
    """The candidates of one conv (see the module doc); ``max_m`` caps the multiplier (default ``kh·kw``).

    Raises:
        ValueError: the fact has no recorded shapes (the kinds cannot count MACs).
    """
    k_area = prod(int(k) for k in fact.kernel_size)
    top = k_area if max_m is None else max(1, min(k_area, int(max_m)))
    out = [Candidate(None, 0, int(dense_macs), dense_params(conv))]
    refused = []
    for name in kinds:
        kind = get_kind(name)
        try:
            kind.check(conv, name=fact.name)
        except UnsupportedConvError as exc:
            refused.append(f"{name}: {exc}")
            continue
        for m in range(1, top + 1):
            macs = int(kind.macs(fact, m))
            if macs >= dense_macs:
                break  # more multipliers cost more still
            out.append(Candidate(name, m, macs, int(kind.params(fact, m))))
    return LayerCandidates(fact.name, fact, tuple(out), tuple(refused))
