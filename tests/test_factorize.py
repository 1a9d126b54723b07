"""Numerical tests of the pure factorisation maths (dsrewrite.factorize)."""

from __future__ import annotations

import pytest
import torch

from dsrewrite.factorize import (
    compose,
    factorize,
    kernel_slices,
    rank_for_energy,
    relative_weight_error,
    spectrum,
    truncation_error,
)

ORDERS = ("dw_pw", "pw_dw")
KERNELS = [(1, 3), (3, 3), (5, 5), (3, 5)]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_full_rank_composes_back_exactly(order, kernel):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 7, *kernel, generator=g, dtype=torch.float64)
    m = kernel[0] * kernel[1]
    spatial, pointwise = factorize(w, m, order)
    back = compose(spatial, pointwise, order, in_channels=7)
    err = (back - w).abs().max().item()
    assert err < 1e-12, f"max abs error {err:.3e}"


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_truncation_error_equals_discarded_spectral_tail(order, kernel, rank):
    """Eckart–Young: ||W - W_m||_F^2 == sum of discarded sigma^2 (to 1e-6, relative)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 6, *kernel, generator=g, dtype=torch.float64)
    spatial, pointwise = factorize(w, rank, order)
    approx = compose(spatial, pointwise, order, in_channels=6)
    err2 = ((approx - w) ** 2).sum().item()
    tail = truncation_error(w, rank, order).item()
    assert abs(err2 - tail) <= 1e-6 * max(1.0, (w**2).sum().item()), f"{err2=} {tail=}"
    rel = relative_weight_error(w, rank, order)
    assert abs(rel - (tail / (w**2).sum().item()) ** 0.5) < 1e-9


def test_svd_beats_any_other_rank1_factorisation():
    """The SVD factorisation has lower weight error than random rank-1 factors."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64)
    s, p = factorize(w, 1, "dw_pw")
    best = ((compose(s, p, "dw_pw", in_channels=4) - w) ** 2).sum().item()
    for _ in range(20):
        s2 = torch.randn_like(s)
        # optimal pointwise for the random spatial filters (least squares per channel)
        mats = kernel_slices(w, "dw_pw")  # (C_in, C_out, K)
        v = s2.reshape(4, 1, 9)
        coef = (mats @ v.transpose(1, 2)) / (v @ v.transpose(1, 2))  # (C_in, C_out, 1)
        p2 = coef.squeeze(-1).t().reshape(8, 4, 1, 1)
        other = ((compose(s2, p2, "dw_pw", in_channels=4) - w) ** 2).sum().item()
        assert best <= other + 1e-12


def test_rank_exceeding_slice_rank_pads_with_zeros():
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64)  # dw_pw slices are 2 x 9: rank <= 2
    s, p = factorize(w, 9, "dw_pw")
    assert s.shape == (27, 1, 3, 3) and p.shape == (2, 27, 1, 1)
    err = (compose(s, p, "dw_pw", in_channels=3) - w).abs().max().item()
    assert err < 1e-12, f"max abs error {err:.3e}"


def test_results_in_weight_dtype_and_device():
    w = torch.randn(8, 4, 3, 3, dtype=torch.bfloat16)
    s, p = factorize(w, 1)
    assert s.dtype == torch.bfloat16 and p.dtype == torch.bfloat16


def test_deterministic_signs():
    w = torch.randn(8, 4, 3, 3)
    a = factorize(w, 2, "pw_dw")
    b = factorize(w.clone(), 2, "pw_dw")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_rank_for_energy_is_smallest_rank_meeting_threshold():
    g = torch.Generator().manual_seed(3)
    # build a kernel with a decaying spectrum per input channel
    u = torch.linalg.qr(torch.randn(16, 9, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))[0]
    sig = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001], dtype=torch.float64)
    mat = u @ torch.diag(sig) @ v.t()  # 16 x 9
    w = mat.reshape(16, 1, 3, 3).repeat(1, 4, 1, 1)  # every input channel has this spectrum
    total = (sig**2).sum()
    for energy in (0.5, 0.9, 0.99, 0.999, 1.0):
        m = rank_for_energy(w, energy, "dw_pw")
        kept = (sig[:m] ** 2).sum() / total
        assert kept >= energy - 1e-12
        if m > 1:
            assert (sig[: m - 1] ** 2).sum() / total < energy
    assert rank_for_energy(w, 0.5) == 1
    with pytest.raises(ValueError, match="energy"):
        rank_for_energy(w, 0.0)


def test_spectrum_shapes():
    w = torch.randn(16, 8, 3, 3)
    assert spectrum(w, "dw_pw").shape == (8, 9)
    assert spectrum(w, "pw_dw").shape == (16, 8)


@pytest.mark.parametrize("bad", [torch.randn(3, 3), torch.randn(1, 1, 1, 1, 3, 3)])
def test_rejects_non_conv_kernels(bad):
    with pytest.raises(ValueError, match="4-d"):
        factorize(bad, 1)


def test_rejects_bad_rank_and_order():
    w = torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match="rank"):
        factorize(w, 0)
    with pytest.raises(ValueError, match="order"):
        factorize(w, 1, "pw_pw")
