# SPDX-License-Identifier: Apache-2.0
"""Solving a symmetric positive definite system in the storage of its own matrix (pure tensor maths).

``torch.linalg.cholesky_ex(a)`` copies ``a`` into a new column-major factor and
``torch.cholesky_solve`` copies the factor again, so a ``D×D`` solve holds two matrices of
its size at any moment. For calibration's largest system (dw_pw's first stage,
``C_in·m·K`` square: 41 MiB at ``D = 2304``) :func:`solve_spd_in_place` holds one: the
factor overwrites the matrix (``cholesky_ex(out=)`` on its column-major view) and two
triangular solves use it where it lies.

The result is bit for bit the one of ``cholesky_solve(h, cholesky_ex(a).L)``: LAPACK reads
the LOWER triangle of ``a``; the matrix ``build`` returns need not be exactly symmetric
(products of float sums rarely are), so its lower triangle is first mirrored onto the upper
one, block by block, and the factorisation of the transposed (column-major) view then reads
the same numbers in the same layout; ``cholesky_solve`` is the same two triangular solves.
Where the factorisation fails (not positive definite) the matrix is built again and solved
with the pseudo-inverse, as ``_solve`` does.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    >>> build = lambda: x.T @ x + 0.1 * torch.eye(6, dtype=torch.float64)
    >>> h = torch.randn(6, 1, generator=g, dtype=torch.float64)
    >>> torch.equal(solve_spd_in_place(build, h), torch.cholesky_solve(h, torch.linalg.cholesky_ex(build())[0]))
    True
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["solve_spd_in_place", "mirror_lower"]


def mirror_lower(a: Tensor, *, block: int = 256) -> Tensor:
    """Copy the strict lower triangle of a square ``a`` onto its upper one, in place, ``block`` rows at a time.

    Example:
        >>> mirror_lower(torch.tensor([[1.0, 9.0], [2.0, 3.0]])).tolist()
        [[1.0, 2.0], [2.0, 3.0]]
    """
    n = a.shape[-1]
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        a[lo:hi, hi:] = a[hi:, lo:hi].mT
        diag = a[lo:hi, lo:hi]
        diag.copy_(diag.tril() + diag.tril(-1).mT)
    return a


def solve_spd_in_place(build: Callable[[], Tensor], h: Tensor) -> Tensor:
    """Solve ``a · w = h`` for the ``(D, D)`` matrix ``build()`` returns (one the caller does not keep), ``h (D, R)``.

    Cholesky in the matrix's own storage (one ``D×D`` matrix alive, not two or three); if the
    matrix is not positive definite, the pseudo-inverse of a newly built one. Off the CPU:
    ``cholesky_ex`` then ``cholesky_solve`` as before (the matrix freed once factored).
    """
    a = build()
    if a.dim() != 2 or a.shape[0] != a.shape[1] or not a.is_contiguous():
        raise ValueError(f"expected a contiguous square matrix, got shape {tuple(a.shape)}")
    if a.device.type != "cpu":  # bit-identity with cholesky_solve is shown for CPU LAPACK only: keep its path
        chol, info = torch.linalg.cholesky_ex(a)
        if bool((info == 0).all()):
            del a
            return torch.cholesky_solve(h, chol)
        return torch.linalg.pinv(a, hermitian=True) @ h
    factor = mirror_lower(a).mT  # column-major: its lower triangle is a's, as LAPACK reads it
    info = torch.empty((), dtype=torch.int32, device=a.device)
    torch.linalg.cholesky_ex(factor, out=(factor, info))
    if int(info) != 0:
        del a, factor
        return torch.linalg.pinv(build(), hermitian=True) @ h
    z = torch.linalg.solve_triangular(factor, h, upper=False)
    return torch.linalg.solve_triangular(factor.mT, z, upper=True)
