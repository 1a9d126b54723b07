"""The N-d im2col against torch's own convs (F.conv1d/2d/3d) and, in 2-d, against the 2-d gather calibration uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dsrewrite.refit.lstsq import gather_patches
from dsrewrite.refit.patches_nd import explicit_padding_nd, gather_patches_nd, im2col_nd

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@st.composite
def cases(draw):
    d = draw(st.sampled_from([1, 2, 3]))
    k = tuple(draw(st.integers(1, 4)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(d))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(d))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    if draw(st.booleans()) and all(s == 1 for s in stride):
        pad = draw(st.sampled_from(["same", "valid"]))
    else:
        pad = tuple(draw(st.integers(0, dil[i] * (k[i] - 1))) for i in range(d))
    size = tuple(draw(st.integers(1, 8)) + dil[i] * (k[i] - 1) + 2 * dil[i] * k[i] for i in range(d))
    return d, k, stride, dil, mode, pad, size, draw(st.integers(0, 2**16))


@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_im2col_nd_reproduces_torch_convs(case):
    d, k, stride, dil, mode, pad, size, seed = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=g)
    w = torch.randn(4, 3, *k, dtype=torch.float64, generator=g)
    patches, pos = im2col_nd(x, k, stride, pad, dil, mode)
    if mode == "zeros":
        y = CONV[d](x, w, stride=stride, padding=pad, dilation=dil)
    else:  # torch applies a non-zero padding mode by padding first, as nn.ConvNd does
        flat = [p for pair in reversed(explicit_padding_nd(pad, k, dil)) for p in pair]
        y = CONV[d](F.pad(x, flat, mode=mode), w, stride=stride, dilation=dil)
    got = patches.reshape(len(pos), -1) @ w.reshape(4, -1).T
    want = y.movedim(1, -1).reshape(-1, 4)
    assert got.shape == want.shape, f"{got.shape} vs {want.shape}"
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err < 1e-10, f"d={d} k={k} stride={stride} dilation={dil} padding={pad} {mode}: max error {err:.3e}"


def test_matches_the_2d_gather_calibration_uses():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 11, 9)
    pos = torch.tensor([[0, 0, 0], [1, 3, 4], [1, 4, 3]])
    a = gather_patches(x, pos, (3, 2), (2, 1), (1, 1), (1, 2), "reflect")
    b = gather_patches_nd(x, pos, (3, 2), (2, 1), (1, 1), (1, 2), "reflect")
    assert torch.equal(a, b)


def test_refuses_mismatched_dims():
    with pytest.raises(ValueError, match="positions"):
        gather_patches_nd(torch.zeros(1, 2, 5, 5), torch.zeros(3, 2, dtype=torch.long), (3, 3))
