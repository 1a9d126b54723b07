# SPDX-License-Identifier: Apache-2.0
"""Refit a layer's last linear stage through the ReLU that follows it (pure tensor maths).

When a conv is followed by ``ReLU(a·y + c)`` (a ReLU, or an eval-mode BatchNorm and a
ReLU, folded into a per-channel ``scale`` ``a`` and ``shift`` ``c``), what the next
layer sees is the activation, not ``y``. Fitting ``y`` by least squares spends the
block's capacity on negative pre-activations that the ReLU zeroes anyway. This module
minimises the error AFTER the activation instead,

    min_W  Σ ‖ReLU(a·(F W) + c) − ReLU(a·Y + c)‖²,

with the auxiliary-variable method of Zhang, Zou, He & Sun, "Accelerating Very Deep
Convolutional Networks for Classification and Detection" (TPAMI 2016, §3.2): relax to
``‖ReLU(t) − ReLU(z)‖² + λ‖z − u‖²`` (``t = a·Y + c``, ``u = a·(F W) + c``) and alternate
a closed-form, element-wise step in ``z`` (:func:`relu_aux_targets`) with a linear
least-squares step in ``W`` on the target ``(z − c) / a`` (the same ridge solve as
:mod:`dsrewrite.lstsq`), raising ``λ`` from small to large. Every iterate is scored on
the true objective and the best one is returned, so the result is never worse than the
starting weights.

Layouts follow :class:`dsrewrite.lstsq.GramStats`: shared features ``F (P, D)`` with
weights ``W (D+1, R)`` (last row: bias), or grouped features ``F (P, G, D)`` (one small
problem per output channel) with ``W (G, D+1, 1)``.

Example (a target no linear map reproduces: the least-squares fit is not the best one
after the ReLU):
    >>> import torch
    >>> from dsrewrite.lstsq import GramStats, ridge_solve
    >>> g = torch.Generator().manual_seed(0)
    >>> f = torch.randn(500, 2, generator=g, dtype=torch.float64)
    >>> y = 2 * f[:, :1] - f[:, 1:] ** 2
    >>> s = GramStats(); s.add(f, y); w_ls = ridge_solve(s.gram, s.cross, 0.0)
    >>> one = torch.ones(1, dtype=torch.float64)
    >>> w, e_ls, e_relu = refit_relu(f, y, w_ls, one, 0 * one, ridge=0.0, bias=True)
    >>> round(e_relu / e_ls, 2)
    0.82
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .lstsq import gram_matrix, ridge_solve

__all__ = ["relu_aux_targets", "predict", "relu_error", "fit_through_relu", "refit_relu", "cross_product",
           "DEFAULT_LAMBDAS"]

#: λ schedule of the alternation: log-spaced from 0.01 to 1, as in Zhang et al.
DEFAULT_LAMBDAS: tuple[float, ...] = tuple(float(v) for v in torch.logspace(-2, 0, 8, dtype=torch.float64))


def relu_aux_targets(target: Tensor, pred: Tensor, lam: float) -> Tensor:
    """Element-wise ``argmin_z (ReLU(t) − ReLU(z))² + λ (z − u)²`` for ``t = target``, ``u = pred``.

    Two candidates: ``z ≥ 0`` gives ``z = max(0, (ReLU(t) + λu) / (1 + λ))``, ``z ≤ 0``
    gives ``z = min(0, u)``; the cheaper one wins.

    Example:
        >>> t = torch.tensor([2.0, -1.0, -1.0]); u = torch.tensor([0.0, -3.0, 0.5])
        >>> relu_aux_targets(t, u, 1.0).tolist()
        [1.0, -3.0, 0.25]
    """
    if lam <= 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    rt = target.clamp_min(0)
    z_pos = (pred * lam).add_(rt).div_(1 + lam).clamp_min_(0)
    z_neg = pred.clamp_max(0)
    d_pos = rt - z_pos
    f_pos = d_pos.mul_(d_pos).add_((z_pos - pred).square_().mul_(lam))
    f_neg = (z_neg - pred).square_().mul_(lam).add_(rt.square_())
    return torch.where(f_pos <= f_neg, z_pos, z_neg)


def predict(features: Tensor, w: Tensor) -> Tensor:
    """``F̃ W``: shared ``(P, D)`` × ``(D+1, R)`` → ``(P, R)``; grouped ``(P, G, D)`` × ``(G, D+1, 1)`` → ``(P, G)``.

    Example:
        >>> predict(torch.ones(2, 3), torch.ones(4, 1)).tolist()
        [[4.0], [4.0]]
    """
    w = w.to(features.dtype)
    if features.dim() == 2:  # F W + b, without materialising [F, 1]
        return torch.addmm(w[-1:], features, w[:-1])
    return torch.einsum("pgd,gd->pg", features, w[:, :-1, 0]) + w[:, -1, 0]


def relu_error(pred: Tensor, targets: Tensor, scale: Tensor, shift: Tensor) -> float:
    """``Σ (ReLU(a·pred + c) − ReLU(a·Y + c))²`` with per-channel (last dim) ``a``, ``c``.

    Example:
        >>> one = torch.ones(1)
        >>> relu_error(torch.tensor([[-2.0], [3.0]]), torch.tensor([[-1.0], [1.0]]), one, 0 * one)
        4.0
    """
    a, c = scale.to(pred), shift.to(pred)
    d = torch.relu(a * pred + c) - torch.relu(a * targets.to(pred) + c)
    return float((d.to(torch.float64) ** 2).sum())


def fit_through_relu(
    targets: Tensor,
    scale: Tensor,
    shift: Tensor,
    start: Any,
    *,
    predict: Callable[[Any], Tensor],
    solve: Callable[[Tensor, Any], Any],
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
) -> tuple[Any, float, float]:
    """The auxiliary-variable loop for any parametrisation; returns ``(best, error at start, best error)``.

    ``predict(cand)`` gives the pre-activation output ``(P, R)`` (or ``(P, G)``) of a
    candidate at the stored positions; ``solve(zy, cand)`` returns a new candidate that
    (approximately) minimises ``‖zy − predict(·)‖²``, e.g. a round of linear
    least-squares refits of a block's stages on the target ``zy`` instead of ``Y``. Each
    iterate is scored on the true objective :func:`relu_error`; the best is returned
    (``start`` itself when nothing beats it). Channels whose ``scale`` is (numerically)
    zero are given the linear target ``Y``.

    Example:
        >>> f = torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float64); y = 3 * f
        >>> one = torch.ones(1, dtype=torch.float64)
        >>> best, e0, e1 = fit_through_relu(y, one, 0 * one, 0.0, predict=lambda w: w * f,
        ...                                 solve=lambda zy, w: float((f * zy).sum() / (f * f).sum()))
        >>> round(best, 3), e0, e1 < 1e-6
        (3.0, 45.0, True)
    """
    y = targets.to(torch.float64)
    a = scale.to(torch.float64).to(y.device)
    c = shift.to(torch.float64).to(y.device)
    dead = a.abs() <= 1e-12 * float(a.abs().max().clamp_min(1e-300))
    a_safe = torch.where(dead, torch.ones_like(a), a)
    # the z step runs in float32 (it only proposes targets); errors are scored in float64
    t32 = (a * y + c).to(torch.float32)
    rt = (a * y + c).clamp_min_(0)
    a32, c32, inv32 = a.to(torch.float32), c.to(torch.float32), (1 / a_safe).to(torch.float32)
    y32 = y.to(torch.float32)

    def score(p: Tensor) -> float:
        d = p.mul(a).add_(c).clamp_min_(0).sub_(rt)
        return float((d * d).sum())

    best = cur = start
    pred = predict(start).to(torch.float64)
    e0 = e_best = score(pred)
    for lam in lambdas:
        z = relu_aux_targets(t32, pred.to(torch.float32).mul_(a32).add_(c32), lam)
        cur = solve(torch.where(dead, y32, z.sub_(c32).mul_(inv32)), cur)
        pred = predict(cur).to(torch.float64)
        e = score(pred)
        if e < e_best:
            best, e_best = cur, e
    return best, e0, e_best


def refit_relu(
    features: Tensor,
    targets: Tensor,
    w: Tensor,
    scale: Tensor,
    shift: Tensor,
    *,
    ridge: float,
    bias: bool,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
) -> tuple[Tensor, float, float]:
    """Lower ``Σ ‖ReLU(a·F̃W + c) − ReLU(a·Y + c)‖²`` from ``W = w``; returns ``(best W, error at w, best error)``.

    ``features`` ``(P, D)`` or ``(P, G, D)``; ``targets`` ``(P, R)`` / ``(P, G)``; ``w`` in the
    matching layout (:func:`predict`); ``scale``/``shift`` per output channel. Channels whose
    ``scale`` is (numerically) zero have a constant activation: they are fitted to ``Y``
    linearly. ``ridge`` is relative as in :func:`dsrewrite.lstsq.ridge_solve`; ``bias=False``
    keeps the bias row at zero. The returned weights are the best iterate (possibly ``w``
    itself), float64.

    Example:
        >>> g = torch.Generator().manual_seed(1)
        >>> f = torch.randn(300, 2, 4, generator=g, dtype=torch.float64)
        >>> y = torch.einsum("pgd,gd->pg", f, torch.randn(2, 4, generator=g, dtype=torch.float64))
        >>> w0 = torch.zeros(2, 5, 1, dtype=torch.float64)
        >>> one = torch.ones(2, dtype=torch.float64)
        >>> _, e0, e1 = refit_relu(f, y, w0, one, -0.5 * one, ridge=0.0, bias=True)
        >>> e1 < 0.1 * e0
        True
    """
    if features.dim() not in (2, 3):
        raise ValueError(f"features must be (P, D) or (P, G, D), got shape {tuple(features.shape)}")
    f64 = features.to(torch.float64)
    gram = gram_matrix(f64)

    def solve(zy: Tensor, _cur: Tensor) -> Tensor:
        return ridge_solve(gram, cross_product(f64, zy), ridge, bias=bias)

    return fit_through_relu(targets, scale, shift, w.to(torch.float64), predict=lambda v: predict(f64, v),
                            solve=solve, lambdas=lambdas)


def cross_product(features: Tensor, targets: Tensor) -> Tensor:
    """``Σ f̃ yᵀ`` as in :class:`~dsrewrite.lstsq.GramStats`: ``(D+1, R)`` shared, ``(G, D+1, 1)`` grouped.

    Example:
        >>> cross_product(torch.ones(3, 1), torch.full((3, 2), 2.0)).tolist()
        [[6.0, 6.0], [6.0, 6.0]]
    """
    y = targets.to(features)
    if features.dim() == 2:  # [Fᵀy; Σy], without materialising [F, 1]
        return torch.cat([features.T @ y, y.sum(0, keepdim=True)], 0)
    return torch.cat([torch.einsum("pgd,pg->gd", features, y), y.sum(0)[:, None]], 1).unsqueeze(-1)
