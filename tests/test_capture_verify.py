"""Tests of dsrewrite.planning.verify: comparing a captured graph's outputs with eager."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import torch

from dsrewrite.planning.verify import compare_outputs, seeded, tolerance


@dataclass
class Out:
    logits: torch.Tensor
    aux: dict


Pair = namedtuple("Pair", "a b")


def test_structured_outputs_compare_leaf_by_leaf() -> None:
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    ref = Out(x, {"p": Pair(x, [x * 2, 3])})
    assert compare_outputs(ref, Out(x.clone(), {"p": Pair(x, [x * 2, 3])}))[0]
    ok, why = compare_outputs(ref, Out(x, {"p": Pair(x, [x * 2 + 1e-2, 3])}))
    assert not ok and why.startswith("output .aux[p][1][0]: max abs diff"), why
    ok, why = compare_outputs(ref, Out(x, {"p": Pair(x, [x * 2, 4])}))
    assert not ok and why == "output .aux[p][1][1]: 3 vs 4"
    ok, why = compare_outputs(ref, Out(x, {"p": Pair(x, [x * 2])}))
    assert not ok and "structure" in why
    assert compare_outputs((x,), (x.double(),)) == (False, "output [0]: dtype torch.float32 vs torch.float64")
    nan = torch.tensor([float("nan"), 1.0])
    assert compare_outputs(nan, nan.clone())[0] and not compare_outputs(nan, torch.tensor([0.0, 1.0]))[0]


def test_tolerance_follows_the_dtype() -> None:
    base = torch.full((4,), 100.0, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        ref, step = base.to(dtype), tolerance(dtype) * 100.0  # the allowed difference at |values| = 100
        assert compare_outputs(ref, (base + step / 2).to(dtype))[0], dtype  # bf16 rounds it away: equal
        assert not compare_outputs(ref, (base + 4 * step).to(dtype))[0], dtype
    assert tolerance(torch.int64) == 0.0
    assert not compare_outputs(torch.tensor([1, 2]), torch.tensor([1, 3]))[0]


def test_seeded_restores_the_callers_stream() -> None:
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    with seeded():
        a = torch.randn(3)
    with seeded():
        b = torch.randn(3)
    assert torch.equal(a, b) and torch.equal(torch.random.get_rng_state(), state)
