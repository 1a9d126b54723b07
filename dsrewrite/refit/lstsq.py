# SPDX-License-Identifier: Apache-2.0
"""Least-squares maths behind calibration: sampled patches, Gram statistics, ridge refits.

Pure tensor functions, no modules. A separable block is written here in four
small tensors, independent of how :class:`~dsrewrite.layers.DepthwiseSeparableConv2d`
stores them (``K = kh·kw``, ``m`` the depth multiplier):

* ``dw_pw``: spatial ``d`` ``(C_in, m, K)``, pointwise ``P`` ``(C_out, C_in, m)``;
  dense equivalent ``Ŵ[o, c, k] = Σ_j P[o, c, j] d[c, j, k]``;
* ``pw_dw``: pointwise ``Q`` ``(C_out, m, C_in)``, spatial ``S`` ``(C_out, m, K)``;
  dense equivalent ``Ŵ[o, c, k] = Σ_j Q[o, j, c] S[o, j, k]``;
* bias ``b`` ``(C_out,)`` or ``None``.

Statistics (:class:`GramStats`) are sums over sampled output positions of
``f̃ f̃ᵀ`` and ``f̃ yᵀ`` with ``f̃ = [f; 1]`` (float64): memory depends on the
layer's channels, never on the amount of data. With ``f`` the flattened input
patch ``p`` (index ``c·K + k``) the output error of ANY linear block is a
quadratic form in its dense kernel (:func:`block_error`), and each stage of a
linear block is a linear least-squares problem given the other stage (the
``refit_*`` functions): alternating between them decreases the regularised
error monotonically.

Ridge: ``ridge`` is relative, ``λ = ridge · mean(diag(G))`` over the non-bias
features; the bias is not penalised.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    >>> w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    >>> pos = sample_positions((2, 6, 6), 20, generator=g)
    >>> p = gather_patches(x, pos, (3, 3), padding=(1, 1))
    >>> y = torch.nn.functional.conv2d(x, w, padding=1)[pos[:, 0], :, pos[:, 1], pos[:, 2]]
    >>> torch.allclose(p.flatten(1) @ w.flatten(1).T, y)
    True
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .spd_solve import solve_spd_in_place

__all__ = [
    "sample_positions",
    "explicit_padding",
    "gather_patches",
    "GramStats",
    "gram_matrix",
    "symmetric_gram",
    "ridge_solve",
    "quadratic_error",
    "dense_dwpw",
    "dense_pwdw",
    "augment",
    "block_error",
    "refit_dwpw_pointwise",
    "refit_dwpw_spatial",
    "refit_pwdw_spatial",
    "refit_pwdw_pointwise",
]

_Pair = Union[int, Sequence[int]]


def _pair(v: _Pair) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = tuple(v)
    return int(a), int(b)


def sample_positions(shape: Sequence[int], count: int, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """``min(count, N·H·W)`` distinct positions ``(n, i, j)`` of an ``(N, H, W)`` grid, as a ``(P, 3)`` long tensor.

    Uniform without replacement, sorted (memory locality); all positions when ``count`` covers them.

    Example:
        >>> sample_positions((1, 2, 2), 10).tolist()
        [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]
    """
    n, h, w = (int(s) for s in shape)
    total = n * h * w
    if count >= total:
        flat = torch.arange(total)
    else:
        flat = torch.randperm(total, generator=generator)[: max(int(count), 0)].sort().values
    return torch.stack([flat // (h * w), (flat // w) % h, flat % w], dim=1)


def explicit_padding(
    padding: Union[str, _Pair], kernel_size: _Pair, dilation: _Pair = 1
) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` padding of a conv, resolving ``"same"``/``"valid"`` as PyTorch does.

    Example:
        >>> explicit_padding("same", (4, 3))
        (1, 2, 1, 1)
    """
    kh, kw = _pair(kernel_size)
    dh, dw = _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            th, tw = dh * (kh - 1), dw * (kw - 1)
            return th // 2, th - th // 2, tw // 2, tw - tw // 2
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = _pair(padding)
    return ph, ph, pw, pw


def gather_patches(
    x: Tensor,
    positions: Tensor,
    kernel_size: _Pair,
    stride: _Pair = 1,
    padding: Union[str, _Pair] = 0,
    dilation: _Pair = 1,
    padding_mode: str = "zeros",
) -> Tensor:
    """The ``(P, C, kh·kw)`` input patches a conv reads to produce the given output positions.

    ``positions`` is ``(P, 3)`` ``(n, i, j)`` on the OUTPUT grid; patch index ``k = a·kw + b``
    matches ``weight.reshape(C_out, C, kh·kw)``. Only the sampled patches are built
    (no full ``unfold``).

    Example:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> gather_patches(x, torch.tensor([[0, 0, 0]]), 3, padding=1)[0, 0].tolist()
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 4.0, 5.0]
    """
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    top, bottom, left, right = explicit_padding(padding, (kh, kw), (dh, dw))
    if top or bottom or left or right:
        if padding_mode == "zeros":
            x = F.pad(x, (left, right, top, bottom))
        else:
            x = F.pad(x, (left, right, top, bottom), mode=padding_mode)
    pos = positions.to(x.device)
    n, i, j = pos[:, 0], pos[:, 1] * sh, pos[:, 2] * sw
    cols = []
    for a in range(kh):
        for b in range(kw):
            cols.append(x[n, :, i + a * dh, j + b * dw])  # (P, C)
    return torch.stack(cols, dim=2)


def symmetric_gram(f: Tensor, *, blocks: int = 8, min_dim: int = 512) -> Tensor:
    """``fᵀf`` for ``f (P, D)``, computing only the upper block triangle when ``D ≥ min_dim``.

    The diagonal and upper blocks are each one matrix product of the same columns as
    ``f.T @ f``'s; the lower blocks are their transposes (``blocks = 8``: 56 % of the work).

    Example:
        >>> f = torch.randn(50, 600, dtype=torch.float64)
        >>> torch.allclose(symmetric_gram(f), f.T @ f)
        True
    """
    d = f.shape[1]
    if d < min_dim or blocks < 2:
        return f.T @ f
    out = torch.empty(d, d, dtype=f.dtype, device=f.device)
    cuts = [round(i * d / blocks) for i in range(blocks + 1)]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        blk = f[:, lo:hi].T @ f[:, lo:]
        out[lo:hi, lo:] = blk
        out[lo:, lo:hi] = blk.T
    return out


def _augment(f: Tensor) -> Tensor:
    """``[f, 1]`` along the last dim."""
    return torch.cat([f, torch.ones(*f.shape[:-1], 1, dtype=f.dtype, device=f.device)], dim=-1)


def _gram(fa: Tensor) -> Tensor:
    """``Σ f̃ f̃ᵀ`` of already augmented features: ``(P, D+1)`` → ``(D+1, D+1)``; ``(P, G, D+1)`` → ``(G, D+1, D+1)``."""
    if fa.dim() == 2:
        return symmetric_gram(fa)
    fg = fa.transpose(0, 1)  # (G, P, D+1)
    return fg.transpose(1, 2) @ fg


def gram_matrix(features: Tensor) -> Tensor:
    """The Gram matrix :class:`GramStats` accumulates, of one set of features, float64.

    ``(P, D)`` → ``(D+1, D+1)``; grouped ``(P, G, D)`` → ``(G, D+1, D+1)``.

    Example:
        >>> gram_matrix(torch.ones(3, 1)).tolist()
        [[3.0, 3.0], [3.0, 3.0]]
    """
    return _gram(_augment(features.to(torch.float64)))


class GramStats:
    """Running sums ``G = Σ f̃ f̃ᵀ``, ``H = Σ f̃ yᵀ``, ``Σ‖y‖²`` with ``f̃ = [f; 1]``, in float64.

    Shared features: ``add(f (P, D), y (P, R))`` → ``gram (D+1, D+1)``, ``cross (D+1, R)``.
    Grouped features (one small problem per output channel):
    ``add(f (P, G, D), y (P, G))`` → ``gram (G, D+1, D+1)``, ``cross (G, D+1, 1)``.

    Example:
        >>> s = GramStats(); s.add(torch.ones(5, 2), torch.full((5, 1), 3.0))
        >>> s.gram.tolist(), s.cross.squeeze(-1).tolist(), s.yy, s.count
        ([[5.0, 5.0, 5.0], [5.0, 5.0, 5.0], [5.0, 5.0, 5.0]], [15.0, 15.0, 15.0], 45.0, 5)
    """

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.gram: Optional[Tensor] = None
        self.cross: Optional[Tensor] = None
        self.yy = 0.0
        self.count = 0

    def add(self, features: Tensor, targets: Tensor) -> None:
        """Accumulate one chunk of sampled positions."""
        f = features.detach().to(self.dtype)
        y = targets.detach().to(device=f.device, dtype=self.dtype)
        if f.dim() not in (2, 3):
            raise ValueError(f"features must be (P, D) or (P, G, D), got shape {tuple(features.shape)}")
        f = _augment(f)
        g = _gram(f)
        if f.dim() == 2:  # (P, D+1), y (P, R)
            h = f.T @ y
        else:  # (P, G, D+1), y (P, G)
            h = f.transpose(0, 1).transpose(1, 2) @ y.T.unsqueeze(-1)
        if self.gram is None:
            self.gram, self.cross = g, h
        else:
            self.gram += g
            self.cross += h  # type: ignore[operator]
        self.yy += float((y * y).sum())
        self.count += int(f.shape[0])

    @property
    def ready(self) -> bool:
        return self.gram is not None and self.count > 0


def ridge_solve(gram: Tensor, cross: Tensor, ridge: float, *, bias: bool = True) -> Tensor:
    """Minimise ``wᵀGw − 2wᵀh + λ‖w_{:D}‖²``; returns ``W (..., D+1, R)`` (last row: the bias, 0 if ``bias=False``).

    Cholesky with a pseudo-inverse fallback for singular systems (``ridge=0``, dead features).

    Example:
        >>> _ = torch.manual_seed(0); s = GramStats(); x = torch.randn(50, 3, dtype=torch.float64)
        >>> s.add(x, x @ torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64) + 4)
        >>> ridge_solve(s.gram, s.cross, 0.0).squeeze(-1).round(decimals=6).tolist()
        [1.0, 2.0, 3.0, 4.0]
    """
    d = gram.shape[-1] - 1
    h = cross if bias else cross[..., :d, :]
    w = _solve_owned([_ridge_matrix(gram if bias else gram[..., :d, :d], ridge, d)], h)
    if not bias:
        w = torch.cat([w, w.new_zeros(*w.shape[:-2], 1, w.shape[-1])], dim=-2)
    return w


def quadratic_error(gram: Tensor, cross: Tensor, yy: float, w: Tensor) -> float:
    """Squared error ``Σ‖W̃ᵀf̃ − y‖²`` over the accumulated positions, from the statistics alone (≥ 0).

    ``w`` is ``(..., D+1, R)`` as returned by :func:`ridge_solve`.

    Example:
        >>> s = GramStats(); s.add(torch.ones(4, 1), torch.full((4, 1), 2.0))
        >>> quadratic_error(s.gram, s.cross, s.yy, torch.tensor([[1.0], [0.0]], dtype=torch.float64))
        4.0
    """
    w = w.to(gram.dtype)
    e = float((w * (gram @ w)).sum() - 2 * (w * cross).sum()) + yy
    return max(e, 0.0)


def dense_dwpw(d: Tensor, p: Tensor) -> Tensor:
    """Dense kernel ``(C_out, C_in, K)`` of a linear dw_pw block: ``Ŵ[o,c,k] = Σ_j P[o,c,j] d[c,j,k]``.

    Example:
        >>> dense_dwpw(torch.ones(2, 1, 9), torch.ones(4, 2, 1)).shape
        torch.Size([4, 2, 9])
    """
    return torch.einsum("ocj,cjk->ock", p, d)


def dense_pwdw(q: Tensor, s: Tensor) -> Tensor:
    """Dense kernel ``(C_out, C_in, K)`` of a linear pw_dw block: ``Ŵ[o,c,k] = Σ_j Q[o,j,c] S[o,j,k]``.

    Example:
        >>> dense_pwdw(torch.ones(4, 1, 2), torch.ones(4, 1, 9)).shape
        torch.Size([4, 2, 9])
    """
    return torch.einsum("ojc,ojk->ock", q, s)


def augment(dense: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``W̃ (C_in·K + 1, C_out)``: the dense kernel flattened, with the bias (or 0) as last row.

    Example:
        >>> augment(torch.ones(4, 2, 9), None).shape
        torch.Size([19, 4])
    """
    c_out = dense.shape[0]
    b = dense.new_zeros(c_out) if bias is None else bias.to(dense)
    return torch.cat([dense.reshape(c_out, -1), b[:, None]], dim=1).T


def block_error(stats: GramStats, dense: Tensor, bias: Optional[Tensor]) -> float:
    """Squared output error of a linear block with dense kernel ``(C_out, C_in, K)`` on patch statistics.

    Example:
        >>> _ = torch.manual_seed(0); s = GramStats(); f = torch.randn(30, 2 * 9, dtype=torch.float64)
        >>> w = torch.randn(3, 2, 9, dtype=torch.float64); s.add(f, f @ w.reshape(3, -1).T)
        >>> block_error(s, w, None) < 1e-12 * s.yy
        True
    """
    assert stats.gram is not None and stats.cross is not None  # internal invariant
    return quadratic_error(stats.gram, stats.cross, stats.yy, augment(dense.to(stats.gram), bias))


def _split(stats: GramStats, c_in: int, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``Σpp (C_in,K,C_in,K)``, ``s (C_in,K)``, ``n``, ``Cp (C_in,K,C_out)``, ``ysum (C_out,)``."""
    g, h = stats.gram, stats.cross
    assert g is not None and h is not None  # internal invariant
    dim = c_in * k
    if g.shape[-1] != dim + 1:
        raise ValueError(f"statistics have {g.shape[-1] - 1} features, expected C_in·K = {c_in}·{k} = {dim}")
    spp = g[:dim, :dim].reshape(c_in, k, c_in, k)
    s = g[:dim, dim].reshape(c_in, k)
    cp = h[:dim].reshape(c_in, k, -1)
    return spp, s, g[dim, dim], cp, h[dim]


def _ridge_matrix(a: Tensor, ridge: float, n_pen: int, *, inplace: bool = False) -> Tensor:
    """``a`` plus ``λ`` on the first ``n_pen`` diagonal entries; a copy unless ``inplace`` (a matrix the caller owns)."""
    a = a if inplace else a.clone()
    diag = torch.diagonal(a[..., :n_pen, :n_pen], dim1=-2, dim2=-1)
    diag += ridge * diag.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return a


def _solve_owned(held: list[Tensor], h: Tensor) -> Tensor:
    """Solve ``held[0] · w = h`` (Cholesky, pseudo-inverse fallback), releasing ``held[0]`` once it is factored.

    The system matrix comes in a list that this function empties, so that no caller keeps it
    alive: while the factor is solved only the factor (and LAPACK's copy of it) exists, two
    ``D×D`` matrices at a time instead of three (peak memory; the same operations, the same bits).
    """
    a = held.pop()
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info == 0).all()):
        del a
        return torch.cholesky_solve(h, chol)
    return torch.linalg.pinv(a, hermitian=True) @ h


def refit_dwpw_pointwise(
    stats: GramStats, d: Tensor, *, bias: bool, ridge: float
) -> tuple[Tensor, Optional[Tensor]]:
    """Best pointwise ``P (C_out, C_in, m)`` (and bias) of a linear dw_pw block given its spatial ``d``.

    Example:
        >>> _ = torch.manual_seed(0); s = GramStats(); f = torch.randn(200, 2 * 9, dtype=torch.float64)
        >>> d = torch.randn(2, 1, 9, dtype=torch.float64); p = torch.randn(3, 2, 1, dtype=torch.float64)
        >>> s.add(f, f @ dense_dwpw(d, p).reshape(3, -1).T)
        >>> torch.allclose(refit_dwpw_pointwise(s, d, bias=False, ridge=0.0)[0], p)
        True
    """
    c_in, m, k = d.shape
    spp, sv, n, cp, ysum = _split(stats, c_in, k)
    d64 = d.to(spp)
    a = torch.einsum("cjk,ckel->cjel", d64, spp)  # (C_in, m, C_in, K)
    gzz = torch.einsum("cjel,eil->cjei", a, d64).reshape(c_in * m, c_in * m)
    gz1 = torch.einsum("cjk,ck->cj", d64, sv).reshape(-1, 1)
    hz = torch.einsum("cjk,cko->cjo", d64, cp).reshape(c_in * m, -1)
    gram = torch.cat([torch.cat([gzz, gz1], 1), torch.cat([gz1.T, n.reshape(1, 1)], 1)], 0)
    cross = torch.cat([hz, ysum[None, :]], 0)
    w = ridge_solve(gram, cross, ridge, bias=bias)  # (C_in·m + 1, C_out)
    p = w[:-1].T.reshape(-1, c_in, m)
    return p, (w[-1] if bias else None)


def refit_dwpw_spatial(stats: GramStats, p: Tensor, b: Optional[Tensor], *, k: int, ridge: float) -> Tensor:
    """Best spatial ``d (C_in, m, K)`` of a linear dw_pw block given its pointwise ``P`` and bias ``b`` (kept).

    One joint system of size ``C_in·m·K``.

    Example:
        >>> _ = torch.manual_seed(0); s = GramStats(); f = torch.randn(200, 2 * 9, dtype=torch.float64)
        >>> d = torch.randn(2, 1, 9, dtype=torch.float64); p = torch.randn(3, 2, 1, dtype=torch.float64)
        >>> s.add(f, f @ dense_dwpw(d, p).reshape(3, -1).T)
        >>> torch.allclose(refit_dwpw_spatial(s, p, None, k=9, ridge=0.0), d)
        True
    """
    c_out, c_in, m = p.shape
    spp, sv, _, cp, _ = _split(stats, c_in, k)
    p64 = p.to(spp)
    qm = torch.einsum("ocj,oei->cjei", p64, p64)  # (C_in, m, C_in, m)
    dim = c_in * m * k
    r = torch.einsum("ocj,cko->cjk", p64, cp)
    if b is not None:
        r = r - torch.einsum("ocj,o,ck->cjk", p64, b.to(spp), sv)

    def system() -> Tensor:  # (C_in,m,K,C_in,m,K), built here: the ridge goes in place, the factor overwrites it
        return _ridge_matrix((qm[:, :, None, :, :, None] * spp[:, None, :, :, None, :]).reshape(dim, dim), ridge, dim,
                             inplace=True)

    return solve_spd_in_place(system, r.reshape(dim, 1)).reshape(c_in, m, k)


def refit_pwdw_spatial(
    stats: GramStats, q: Tensor, *, k: int, bias: bool, ridge: float, chunk: int = 256
) -> tuple[Tensor, Optional[Tensor]]:
    """Best spatial ``S (C_out, m, K)`` (and bias) of a linear pw_dw block given its pointwise ``Q``.

    ``C_out`` independent systems of size ``m·K + 1``, built ``chunk`` outputs at a time.

    Example:
        >>> _ = torch.manual_seed(0); s = GramStats(); f = torch.randn(200, 2 * 9, dtype=torch.float64)
        >>> q = torch.randn(3, 1, 2, dtype=torch.float64); sp = torch.randn(3, 1, 9, dtype=torch.float64)
        >>> s.add(f, f @ dense_pwdw(q, sp).reshape(3, -1).T)
        >>> torch.allclose(refit_pwdw_spatial(s, q, k=9, bias=False, ridge=0.0)[0], sp)
        True
    """
    c_out, m, c_in = q.shape
    spp, sv, n, cp, ysum = _split(stats, c_in, k)
    q64 = q.to(spp)
    by_lag = spp.permute(0, 2, 1, 3).reshape(c_in * c_in, k * k)  # (C_in·C_in, K·K)
    chunk = max(1, min(chunk, (1 << 23) // (m * m * c_in * c_in)))
    out_s, out_b = [], []
    for lo in range(0, c_out, chunk):
        qc = q64[lo : lo + chunk]
        oc = qc.shape[0]
        qq = (qc[:, :, None, :, None] * qc[:, None, :, None, :]).reshape(oc * m * m, c_in * c_in)
        g = (qq @ by_lag).reshape(oc, m, m, k, k).permute(0, 1, 3, 2, 4).reshape(oc, m * k, m * k)
        g1 = torch.einsum("ojc,ck->ojk", qc, sv).reshape(oc, m * k, 1)
        h = torch.einsum("ojc,cko->ojk", qc, cp[:, :, lo : lo + oc]).reshape(oc, m * k, 1)
        nn_ = n.expand(oc).reshape(oc, 1, 1)
        gram = torch.cat([torch.cat([g, g1], 2), torch.cat([g1.transpose(1, 2), nn_], 2)], 1)
        cross = torch.cat([h, ysum[lo : lo + oc].reshape(oc, 1, 1)], 1)
        w = ridge_solve(gram, cross, ridge, bias=bias)  # (oc, mK+1, 1)
        out_s.append(w[:, :-1, 0].reshape(oc, m, k))
        out_b.append(w[:, -1, 0])
    return torch.cat(out_s), (torch.cat(out_b) if bias else None)


def refit_pwdw_pointwise(
    stats: GramStats, s: Tensor, b: Optional[Tensor], *, in_channels: int, ridge: float
) -> Tensor:
    """Best pointwise ``Q (C_out, m, C_in)`` of a linear pw_dw block given its spatial ``S`` and bias ``b`` (kept).

    ``C_out`` independent systems of size ``m·C_in``:
    ``G_o[(j,c),(i,e)] = Σ_{k,l} S[o,j,k] S[o,i,l] Σpp[c,k,e,l]``, built a chunk of outputs at a time.

    Example:
        >>> _ = torch.manual_seed(0); st = GramStats(); f = torch.randn(200, 2 * 9, dtype=torch.float64)
        >>> q = torch.randn(3, 1, 2, dtype=torch.float64); sp = torch.randn(3, 1, 9, dtype=torch.float64)
        >>> st.add(f, f @ dense_pwdw(q, sp).reshape(3, -1).T)
        >>> torch.allclose(refit_pwdw_pointwise(st, sp, None, in_channels=2, ridge=0.0), q)
        True
    """
    c_out, m, k = s.shape
    c_in = in_channels
    spp, sv, _, cp, _ = _split(stats, c_in, k)
    s64 = s.to(spp)
    by_lag = spp.permute(1, 3, 0, 2).reshape(k * k, c_in * c_in)  # (K·K, C_in·C_in)
    chunk = max(1, (1 << 23) // (m * m * c_in * c_in))
    out = []
    for lo in range(0, c_out, chunk):
        sc = s64[lo : lo + chunk]
        oc = sc.shape[0]
        ss = torch.einsum("ojk,oil->ojikl", sc, sc).reshape(oc * m * m, k * k)
        g = (ss @ by_lag).reshape(oc, m, m, c_in, c_in).permute(0, 1, 3, 2, 4).reshape(oc, m * c_in, m * c_in)
        co = cp[:, :, lo : lo + oc]  # (C_in, K, oc)
        if b is not None:
            co = co - sv[:, :, None] * b.to(spp)[None, None, lo : lo + oc]
        h = torch.einsum("ojk,cko->ojc", sc, co)
        held = [_ridge_matrix(g, ridge, m * c_in, inplace=True)]  # g is this chunk's own
        del g
        sol = _solve_owned(held, h.reshape(oc, m * c_in, 1))
        out.append(sol.reshape(oc, m, c_in))
    return torch.cat(out)

