# SPDX-License-Identifier: Apache-2.0
"""The recommended inference form (``prepare_for_deployment``), channels_last, and the glibc malloc setting.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> dep = prepare_for_deployment(net, torch.randn(1, 3, 16, 16))
    >>> type(dep[1]).__name__, dep.training, net.training
    ('Identity', False, True)
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ..runtime.run import evaluating
from ..runtime.tolerance import parity_tolerance
from .bn import fold_batchnorm
from .hoist import hoist_pointwise
from .parity import DeployInputError, Inputs, ParityError
from .parity import as_tuple as _as_tuple
from .parity import flat_outputs as _flat_outputs
from .parity import max_abs_diff as _max_abs_diff

__all__ = ["GLIBC_TUNABLES", "channels_last_format", "to_channels_last", "prepare_for_deployment", "tune_glibc_malloc"]

#: The environment setting equivalent to :func:`tune_glibc_malloc` (read by glibc at process start):
#: ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824``.
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824"


def channels_last_format(t: torch.Tensor) -> Optional[torch.memory_format]:
    """``channels_last`` for a 4-d tensor, ``channels_last_3d`` for a 5-d one, else ``None``.

    Example:
        >>> channels_last_format(torch.zeros(1, 2, 3, 4, 5))
        torch.channels_last_3d
    """
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())


def _as_channels_last(t: torch.Tensor) -> torch.Tensor:
    fmt = channels_last_format(t)
    return t if fmt is None else t.contiguous(memory_format=fmt)


def to_channels_last(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its 4-d parameters and buffers in ``channels_last`` and 5-d ones in ``channels_last_3d``.

    Feed it inputs in the same format (NHWC, NDHWC): convs then keep channels last end to
    end (on CPU, depthwise ``Conv3d`` is only fast in ``channels_last_3d``).

    Example:
        >>> m = to_channels_last(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv3d(8, 8, 3)))
        >>> m[0].weight.is_contiguous(memory_format=torch.channels_last)
        True
        >>> m[1].weight.is_contiguous(memory_format=torch.channels_last_3d)
        True
    """
    return copy.deepcopy(model)._apply(_as_channels_last)


def prepare_for_deployment(
    model: nn.Module,
    example_input: Inputs,
    *,
    channels_last: bool = True,
    fold_bn: bool = True,
    hoist: bool = True,
    check: bool = True,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
) -> nn.Module:
    """The recommended inference form: an eval-mode copy, BN folded, pointwise stages hoisted, channels_last.

    ``hoist`` applies :func:`dsrewrite.hoist.hoist_pointwise`: the pointwise stage of each
    ``pw_dw`` block fed by a nearest/bilinear upsample (optionally through a skip
    concatenation) runs before the upsample, at the low resolution, and the concatenation
    disappears (exact up to rounding; see docs/latency.md). The modules it rewrites become
    ``torch.fx.GraphModule`` children: keep the undeployed model for fine-tuning and saving.

    With ``check=True`` the result is run on ``example_input`` against the original (in
    eval mode, without changing its flags) and :class:`ParityError` is raised when
    ``max|new − original| > atol + rtol · max|original|`` (dtype defaults in
    :func:`parity_tolerance`). Inputs to a channels_last model should be channels_last too.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> x = torch.randn(1, 3, 16, 16)
        >>> dep = prepare_for_deployment(net, x)
        >>> dep.training, net.training, dep[0].weight.is_contiguous(memory_format=torch.channels_last)
        (False, True, True)
    """
    args = _as_tuple(example_input)
    deployed = copy.deepcopy(model).eval()
    if fold_bn:
        deployed = fold_batchnorm(deployed, inplace=True)
    if hoist:
        deployed = hoist_pointwise(deployed, args, inplace=True).model
    if channels_last:
        deployed = deployed._apply(_as_channels_last)  # 4-d: channels_last, 5-d: channels_last_3d
    if check:
        with torch.no_grad(), evaluating(model):
            ref = _flat_outputs(model(*args), "the original model")
            fed = tuple(_as_channels_last(a) if channels_last and isinstance(a, torch.Tensor) else a for a in args)
            got = _flat_outputs(deployed(*fed), "the deployed model")
        diff, _ = _max_abs_diff(got, ref, "prepare_for_deployment")
        tol = max(parity_tolerance(r, rtol=rtol, atol=atol) for r in ref)
        if not diff <= tol:
            raise ParityError(
                f"the deployment form (fold_bn={fold_bn}, hoist={hoist}, channels_last={channels_last}) differs from the "
                f"original by max |Δ| = {diff:.3g} > tolerance {tol:.3g} on the example input. "
                "Hint: check for BN modules shared or called twice; pass check=False to skip."
            )
    return deployed


def tune_glibc_malloc(*, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's malloc keep large freed blocks for reuse (process-wide; opt-in; see docs/latency.md).

    By default glibc serves every block of ≥ 32 MiB (one fp32 activation of 32 channels at
    512×512) with a fresh ``mmap`` and unmaps it on free, so each forward pass page-faults
    in new zeroed pages; the memory-bound depthwise convs (and in NCHW their large scratch
    buffers) pay this on every call. This calls ``mallopt(M_MMAP_MAX, 0)`` (no mmap for large
    blocks) and ``mallopt(M_TRIM_THRESHOLD, trim_threshold)`` (keep up to that much free heap
    top), the run-time form of :data:`GLIBC_TUNABLES`. The cost: freed memory is returned to
    the kernel less eagerly. Returns ``False`` (and changes nothing) where the C library is
    not glibc; it does not affect an allocator preloaded in glibc's place (jemalloc, tcmalloc).

    Example:
        >>> tune_glibc_malloc() in (True, False)
        True
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if not isinstance(trim_threshold, int) or trim_threshold < 0:
        raise DeployInputError(f"trim_threshold must be an int >= 0 (bytes), got {trim_threshold!r}.")
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
    ok_mmap = libc.mallopt(m_mmap_max, 0)
    ok_trim = libc.mallopt(m_trim_threshold, ctypes.c_int(min(trim_threshold, 2**31 - 1)))
    return bool(ok_mmap and ok_trim)
