# SPDX-License-Identifier: Apache-2.0
"""BatchNorm folding: every eval-mode BN that directly follows a conv, folded into that conv.

The other inference forms live beside it: :mod:`dsrewrite.deploy.prepare` (channels_last,
``prepare_for_deployment``), :mod:`dsrewrite.deploy.onnx` (export with a parity check) and
:mod:`dsrewrite.deploy.hoist`.

* :func:`fold_batchnorm` folds every eval-mode ``BatchNorm1d/2d/3d`` that directly follows a
  conv into that conv (a plain torch conv: 1/2/3-d, regular or transposed; the last stage of a
  :class:`~dsrewrite.layers.DepthwiseSeparableConv2d`, or, for a block's ``mid_norm``,
  its first stage) and puts ``nn.Identity`` where the BN was.
* :func:`to_channels_last` returns a channels_last copy (NHWC weights; feed NHWC inputs too).
* :func:`export_onnx` exports with ``torch.onnx.export``, runs ONNX Runtime (CPU) on the
  same input and checks the largest absolute difference against eager.
* :func:`prepare_for_deployment` is the recommended inference form: eval, BN folded,
  channels_last, checked against the original on the example input.

Folding needs no data: ``y = γ·(conv(x) − μ)/√(σ²+ε) + β`` is a conv with every output
channel's weights scaled by ``γ/√(σ²+ε)`` and bias ``(b − μ)·γ/√(σ²+ε) + β``; the
arithmetic is done in float64 and cast back to the conv's dtype.

Where a conv→BN pair is found (:func:`find_conv_bn_pairs`):

* consecutive children of a plain ``nn.Sequential`` (smp's ``Conv2dReLU`` is
  ``Sequential(conv, bn, relu)``): the sure case;
* otherwise a ``torch.fx`` symbolic trace of the module (tried from the root down; a
  module that does not trace is searched child by child): a BN whose only input is a
  conv call whose only user is that BN;
* the ``mid_norm`` of a :class:`DepthwiseSeparableConv2d` (any replacement block whose kind
  names one in its :class:`~dsrewrite.kinds.Stages`), which follows its first stage.

Which stage a BN after a replacement block folds into is its kind's answer
(:meth:`~dsrewrite.kinds.ReplacementKind.fold_bn_into`: the last stage for the built-ins).

A pair is folded only if both modules are called once and held under one name, the conv
has its torch class's own forward (no weight standardisation, no own padding) and
no hooks, and the BN has running statistics. A BN in training mode normalises with batch
statistics and cannot be folded: :class:`DeployInputError` says so (call ``.eval()``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> folded = fold_batchnorm(net)
    >>> type(folded[1]).__name__, type(net[1]).__name__
    ('Identity', 'BatchNorm2d')
    >>> x = torch.randn(1, 3, 16, 16)
    >>> torch.allclose(folded(x), net(x), atol=1e-5)
    True
"""


from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..kinds import Stages, kind_of
from ..kinds.separable_nd import CONV_TYPES
from ..runtime.modules import join as _join
from ..runtime.modules import set_submodule as _set_submodule
from ..runtime.tracer import LeafTracer
from .parity import DeployInputError

__all__ = ["FoldPair", "find_conv_bn_pairs", "fold_batchnorm"]


@dataclass(frozen=True)
class FoldPair:
    """One conv→BN pair: qualified names of the conv that absorbs the BN and of the BN; ``via``
    says how it was found (``"sequential"``, ``"fx"`` or ``"mid_norm"``)."""

    conv: str
    bn: str
    via: str


# --------------------------------------------------------------------------------------
# Finding conv→BN pairs
# --------------------------------------------------------------------------------------
def _plain_conv(m: nn.Module) -> bool:
    base = next((t for t in CONV_TYPES if isinstance(m, t)), None)  # Conv1d/2d/3d, ConvTranspose1d/2d/3d
    return (
        base is not None
        and type(m).forward is base.forward
        and getattr(type(m), "_conv_forward", None) is getattr(base, "_conv_forward", None)
        and not (m._forward_hooks or m._forward_pre_hooks)
    )


def _block_stages(m: nn.Module) -> Optional[Stages]:
    """The stages of a replacement block without hooks whose kind knows its forward, else ``None``."""
    kind = kind_of(m)
    if kind is None or m._forward_hooks or m._forward_pre_hooks:
        return None
    return kind.stages(m)


def _bn_stage(block: nn.Module) -> Optional[str]:
    """The stage (relative name) of a replacement block that a BN following it folds into, if it is a plain conv."""
    kind = kind_of(block)
    stage = None if kind is None or _block_stages(block) is None else kind.fold_bn_into(block)
    return stage if stage is not None and _plain_conv(block.get_submodule(stage)) else None


def _is_bn(m: nn.Module) -> bool:
    return (
        isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
        and type(m).forward is _BatchNorm.forward
        and not (m._forward_hooks or m._forward_pre_hooks)
    )


def _plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _trace(module: nn.Module) -> Optional[torch.fx.Graph]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LeafTracer().trace(module)
    except Exception:  # any failure to trace only means "search the children instead"
        return None


def _pairs_from_graph(graph: torch.fx.Graph, module: nn.Module, prefix: str) -> list[FoldPair]:
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_bn(module.get_submodule(node.target)):
            continue
        if len(node.args) != 1 or node.kwargs or calls[node.target] != 1:
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        if calls[src.target] == 1 and _plain_conv(module.get_submodule(src.target)):
            pairs.append(FoldPair(_join(prefix, src.target), _join(prefix, node.target), "fx"))
    return pairs


def _collect(module: nn.Module, prefix: str, out: list[FoldPair]) -> None:
    if _plain_sequential(module):
        children = list(module.named_children())
        for (na, a), (nb, b) in zip(children, children[1:]):
            if _is_bn(b) and _plain_conv(a):
                out.append(FoldPair(_join(prefix, na), _join(prefix, nb), "sequential"))
            elif _is_bn(b) and (stage := _bn_stage(a)) is not None:
                out.append(FoldPair(_join(_join(prefix, na), stage), _join(prefix, nb), "sequential"))
        for name, child in children:
            _collect(child, _join(prefix, name), out)
        return
    graph = _trace(module)
    if graph is not None:
        out.extend(_pairs_from_graph(graph, module, prefix))
        return
    for name, child in module.named_children():
        _collect(child, _join(prefix, name), out)


def find_conv_bn_pairs(model: nn.Module) -> list[FoldPair]:
    """The conv→BN pairs :func:`fold_batchnorm` would fold, in module order (see the module doc).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8))
        >>> find_conv_bn_pairs(net)
        [FoldPair(conv='0', bn='1', via='sequential')]
    """
    found: list[FoldPair] = []
    for name, m in model.named_modules():
        st = _block_stages(m)
        if st is not None and st.mid_norm is not None and _is_bn(m.get_submodule(st.mid_norm)) \
                and _plain_conv(m.get_submodule(st.first)):
            found.append(FoldPair(_join(name, st.first), _join(name, st.mid_norm), "mid_norm"))
    _collect(model, "", found)
    # Only modules held under exactly one name: a shared module may run elsewhere too.
    held = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    seen_bn, seen_conv, pairs = set(), set(), []
    for p in found:
        conv, bn = model.get_submodule(p.conv), model.get_submodule(p.bn)
        if p.bn in seen_bn or p.conv in seen_conv or held[id(conv)] != 1 or held[id(bn)] != 1:
            continue
        if bn.running_mean is None or bn.running_var is None or conv.out_channels != bn.num_features:
            continue
        seen_bn.add(p.bn)
        seen_conv.add(p.conv)
        pairs.append(p)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(pairs, key=lambda p: order.get(p.bn, 0))


# --------------------------------------------------------------------------------------
# Folding
# --------------------------------------------------------------------------------------
def _fold_into(conv: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` (eval statistics) into ``conv`` in place, computing in float64.

    Each output channel ``o`` of the conv is scaled by ``γ_o / √(var_o + ε)``; in a
    transposed conv's kernel ``(C_in, C_out/groups, *k)`` output ``o`` is column
    ``o mod C_out/groups`` of the rows of its group.
    """

    def f64(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.detach().double()

    w = f64(conv.weight)
    mean, var = f64(bn.running_mean), f64(bn.running_var)
    gamma = f64(bn.weight) if bn.weight is not None else torch.ones_like(mean)
    beta = f64(bn.bias) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma * torch.rsqrt(var + bn.eps)
    ones = (1,) * (w.dim() - 2)
    if conv.transposed:
        g = conv.groups
        w = (w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
             * scale.reshape(g, 1, w.shape[1], *ones)).reshape(w.shape)
    else:
        w = w * scale.reshape(-1, 1, *ones)
    bias = f64(conv.bias)
    b = (bias - mean if bias is not None else -mean) * scale + beta
    with torch.no_grad():
        conv.weight.copy_(w)
        if conv.bias is not None:
            conv.bias.copy_(b)
        else:
            conv.bias = nn.Parameter(
                b.to(device=conv.weight.device, dtype=conv.weight.dtype),
                requires_grad=conv.weight.requires_grad,
            )


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every eval-mode BatchNorm1d/2d/3d that directly follows a conv into it; BN → ``nn.Identity``.

    Covers plain ``ConvNd → BN`` and ``ConvTransposeNd → BN`` (any groups), ``DepthwiseSeparableConv2d → BN`` (into the block's last
    stage) and a block's ``mid_norm`` (into its first stage; the block's ``mid_norm_kind``
    becomes ``None``). The model's class, device, dtype and train/eval flags are kept;
    the caller's model is untouched unless ``inplace=True``.

    Raises:
        DeployInputError: a BN to be folded is in training mode (call ``model.eval()`` first).

    Example:
        >>> from dsrewrite.layers import DepthwiseSeparableConv2d
        >>> net = nn.Sequential(DepthwiseSeparableConv2d(4, 8, 3, mid_norm="batchnorm"), nn.BatchNorm2d(8)).eval()
        >>> folded = fold_batchnorm(net)
        >>> sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), folded[0].mid_norm_kind
        (0, None)
        >>> x = torch.randn(2, 4, 9, 9)
        >>> torch.allclose(folded(x), net(x), atol=1e-5)
        True
    """
    target = model if inplace else copy.deepcopy(model)
    pairs = find_conv_bn_pairs(target)
    training = [p.bn for p in pairs if target.get_submodule(p.bn).training]
    if training:
        raise DeployInputError(
            f"BatchNorm {training[0]!r} (and {len(training) - 1} more) is in training mode: it normalises "
            "with batch statistics, which cannot be folded into a conv. Hint: call model.eval() first."
        )
    for p in pairs:
        _fold_into(target.get_submodule(p.conv), target.get_submodule(p.bn))  # type: ignore[arg-type]
        _set_submodule(target, p.bn, nn.Identity())
        if p.via == "mid_norm":
            target.get_submodule(p.bn.rpartition(".")[0]).mid_norm_kind = None
    return target
