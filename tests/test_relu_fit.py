"""Fitting through the activation: the maths (dsrewrite.relu_fit) and the graph reading (dsrewrite.activation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsrewrite.activation import following_relus
from dsrewrite.lstsq import GramStats, gram_matrix, ridge_solve
from dsrewrite.relu_fit import (
    cross_product,
    fit_through_relu,
    predict,
    refit_relu,
    relu_aux_targets,
    relu_error,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------
# relu_fit: numerical
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [0.01, 0.3, 1.0, 5.0])
def test_aux_targets_minimise_the_relaxed_objective(lam):
    """Against a brute-force search over a fine grid of z, element by element."""
    g = torch.Generator().manual_seed(0)
    t = 2 * torch.randn(200, generator=g, dtype=torch.float64)
    u = 2 * torch.randn(200, generator=g, dtype=torch.float64)
    grid = torch.linspace(-12, 12, 48001, dtype=torch.float64)

    def obj(z):
        return (t.clamp_min(0)[:, None] - z.clamp_min(0)) ** 2 + lam * (z - u[:, None]) ** 2

    z = relu_aux_targets(t, u, lam)
    ours = obj(z[:, None])[:, 0]
    brute = obj(grid[None, :]).min(dim=1).values
    gap = float((ours - brute).max())
    assert gap <= 1e-6, f"closed-form z is worse than the grid minimum by up to {gap}"


def test_aux_targets_reject_nonpositive_lambda():
    with pytest.raises(ValueError, match="lam must be > 0"):
        relu_aux_targets(torch.zeros(2), torch.zeros(2), 0.0)


def _nonlinear_problem(grouped: bool):
    g = torch.Generator().manual_seed(3)
    if grouped:
        f = torch.randn(600, 3, 4, generator=g, dtype=torch.float64)
        y = torch.einsum("pgd,gd->pg", f, torch.randn(3, 4, generator=g, dtype=torch.float64)) - f[..., 0] ** 2
    else:
        f = torch.randn(600, 4, generator=g, dtype=torch.float64)
        y = f @ torch.randn(4, 3, generator=g, dtype=torch.float64) - f[:, :3] ** 2
    return f, y


@pytest.mark.parametrize("grouped", [False, True])
def test_refit_relu_beats_least_squares_after_the_relu(grouped):
    f, y = _nonlinear_problem(grouped)
    s = GramStats()
    s.add(f, y)
    w_ls = ridge_solve(s.gram, s.cross, 0.0)
    a = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    c = torch.tensor([0.0, 0.3, -0.2], dtype=torch.float64)
    w, e_ls, e_new = refit_relu(f, y, w_ls, a, c, ridge=0.0, bias=True)
    assert abs(e_ls - relu_error(predict(f, w_ls), y, a, c)) < 1e-9 * e_ls
    assert abs(e_new - relu_error(predict(f, w), y, a, c)) < 1e-9 * e_ls
    assert e_new < 0.95 * e_ls, f"through-ReLU error {e_new} vs least squares {e_ls}"


def test_refit_relu_dead_channel_gets_the_linear_fit():
    """A channel with scale 0 has a constant activation: its weights are the plain least-squares ones."""
    f, y = _nonlinear_problem(False)
    s = GramStats()
    s.add(f, y)
    w_ls = ridge_solve(s.gram, s.cross, 0.0)
    a = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    w, _, _ = refit_relu(f, y, torch.zeros_like(w_ls), a, torch.zeros(3, dtype=torch.float64), ridge=0.0, bias=True)
    err = float((w[:, 1] - w_ls[:, 1]).abs().max())
    # the z step hands its targets over in float32: agreement to float32 precision, not float64's
    assert err < 1e-6, f"dead channel's weights differ from least squares by {err}"
    assert float((w[:, 0] - w_ls[:, 0]).abs().max()) > 1e-3  # a live channel does move


def test_refit_relu_without_bias_keeps_it_zero():
    f, y = _nonlinear_problem(False)
    one = torch.ones(3, dtype=torch.float64)
    w, _, _ = refit_relu(f, y, torch.zeros(5, 3, dtype=torch.float64), one, 0 * one, ridge=1e-3, bias=False)
    assert torch.equal(w[-1], torch.zeros(3, dtype=torch.float64))


def test_fit_through_relu_keeps_the_start_when_nothing_helps():
    y = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    one = torch.ones(2, dtype=torch.float64)
    start = y.clone()  # exact already
    best, e0, e1 = fit_through_relu(y, one, 0 * one, start, predict=lambda v: v, solve=lambda zy, v: v + 1.0)
    assert best is start and e0 == e1 == 0.0


def test_gram_and_cross_match_gramstats():
    g = torch.Generator().manual_seed(5)
    for f, y in [(torch.randn(40, 3, generator=g), torch.randn(40, 2, generator=g)),
                 (torch.randn(40, 2, 3, generator=g), torch.randn(40, 2, generator=g))]:
        s = GramStats()
        s.add(f, y)
        assert torch.allclose(gram_matrix(f), s.gram, atol=1e-5)
        assert torch.allclose(cross_product(f.double(), y.double()), s.cross, atol=1e-9)


# ------------------------------------------------------------------------------------------
# activation: structural and negative
# ------------------------------------------------------------------------------------------
def _bn(c: int, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=g))  # some negative scales too
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn


def test_bn_relu_affine_matches_the_modules():
    net = nn.Sequential(nn.Conv2d(3, 6, 3), _bn(6), nn.ReLU(inplace=True)).eval()
    found, note = following_relus(net, ["0"])
    assert note == "" and found["0"].via == "BatchNorm2d 1 + ReLU 2"
    y = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    a, c = found["0"].scale.view(1, -1, 1, 1), found["0"].shift.view(1, -1, 1, 1)
    with torch.no_grad():
        want = net[2](net[1].double()(y.clone()))
    err = float((torch.relu(a * y + c) - want).abs().max())
    assert err < 1e-12, f"folded BN+ReLU differs from the modules by {err}"


class _Functional(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.conv, self.how = nn.Conv2d(3, 4, 3), how

    def forward(self, x):
        y = self.conv(x)
        if self.how == "F.relu":
            return F.relu(y)
        if self.how == "torch.relu":
            return torch.relu(y)
        return y.relu()


@pytest.mark.parametrize("how", ["F.relu", "torch.relu", "method"])
def test_functional_relus_are_found(how):
    found, _ = following_relus(_Functional(how).eval(), ["conv"])
    assert found["conv"].scale.tolist() == [1.0] * 4 and found["conv"].shift.tolist() == [0.0] * 4


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)) + x)


class _TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y) + y


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return torch.relu(self.conv(x))
        return self.conv(x)


@pytest.mark.parametrize("model,name", [
    (_Residual(), "conv"),  # BN then a residual add before the ReLU
    (_TwoUsers(), "conv"),  # the raw conv output is read elsewhere too
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6()), "0"),  # not a ReLU
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU()), "0"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()), "0"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Identity(), nn.Conv2d(4, 4, 1)), "0"),
])
def test_other_successors_are_not_fitted_through(model, name):
    found, note = following_relus(model.eval(), [name])
    assert found == {} and note == ""


def test_bn_in_training_mode_is_not_folded():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    assert following_relus(net, ["0"])[0] == {}


def test_shared_conv_with_different_successors_is_not_fitted_through():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn1, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), _bn(4, 1), _bn(4, 2)

        def forward(self, x):
            return torch.relu(self.bn1(self.conv(x))) + torch.relu(self.bn2(self.conv(x)))

    assert following_relus(Shared().eval(), ["conv"])[0] == {}


def test_untraceable_model_gives_a_note():
    found, note = following_relus(_Untraceable().eval(), ["conv"])
    assert found == {} and "torch.fx could not trace" in note and "fitted on its conv output" in note
