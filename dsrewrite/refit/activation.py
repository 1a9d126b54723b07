# SPDX-License-Identifier: Apache-2.0
"""Which convs feed straight into a ReLU (through at most an eval-mode BatchNorm2d).

Calibration can fit a block through the activation that follows it
(:mod:`dsrewrite.relu_fit`) only when that activation is exactly ``ReLU(a·y + c)`` per
channel and nothing else reads the conv's raw output. :func:`following_relus` reads
this off the model's ``torch.fx`` graph (convs kept as leaves, as in
:mod:`dsrewrite.capture`): a conv call site whose only user is

* a ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu``, in place or not): ``a = 1``, ``c = 0``;
* or an ``nn.BatchNorm2d`` using running statistics (eval mode), whose only user is such a
  ReLU: ``a = γ / √(σ² + ε)``, ``c = β − μ·a``.

Anything else (a residual add, a BN subclass, a graph fx cannot trace) is left out and
calibrated on the conv's output as before.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    >>> found, note = following_relus(net, ["0", "3"])
    >>> sorted(found), found["0"].via, note
    (['0'], 'BatchNorm2d 1 + ReLU 2', '')
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime.tracer import timm_fx_extras
from ..graph import ConvLeafTracer

__all__ = ["FollowingReLU", "following_relus"]

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, torch.nn.functional.relu_)
_RELU_METHODS = ("relu", "relu_")


@dataclass(frozen=True)
class FollowingReLU:
    """The activation after conv ``name``: ``ReLU(scale·y + shift)`` per output channel (float64)."""

    name: str
    via: str
    scale: Tensor
    shift: Tensor


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(str(node.target))) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _relu_label(node: torch.fx.Node) -> str:
    return f"ReLU {node.target}" if node.op == "call_module" else "ReLU"


def _bn_affine(bn: nn.BatchNorm2d) -> Optional[tuple[Tensor, Tensor]]:
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return None
    mean = bn.running_mean.detach().to(torch.float64)
    inv = torch.rsqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    gamma = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma * inv
    return scale.cpu(), (beta - mean * scale).cpu()


def _only_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    # the node must be the user's only tensor input (not e.g. relu(x) + x via getitem)
    if user.op == "call_function" and user.target is operator.getitem:
        return None
    return user


def following_relus(model: nn.Module, names: Sequence[str]) -> tuple[dict[str, FollowingReLU], str]:
    """``{conv name: FollowingReLU}`` for the named convs followed only by (BN +) ReLU, and a note.

    The model should be in eval mode (a BatchNorm in training mode does not count). The
    note is ``""`` or says why nothing could be found (``torch.fx`` failed to trace).
    A conv called more than once (shared) is included only if every call site qualifies
    with the same BatchNorm.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True))
        >>> found, _ = following_relus(net, ["0"])
        >>> found["0"].scale.tolist(), found["0"].via
        ([1.0, 1.0, 1.0, 1.0], 'ReLU 1')
    """
    wanted = set(names)
    if not wanted:
        return {}, ""
    leaves, funcs = timm_fx_extras(model)
    try:
        graph = ConvLeafTracer(leaf_types=leaves, autowrap_functions=funcs).trace(model)
    except Exception as e:  # fx raises many kinds; all mean "cannot trace"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return {}, (f"activation-aware refit off: torch.fx could not trace the original model ({first}); "
                    "every layer is fitted on its conv output")
    modules = dict(model.named_modules())
    found: dict[str, FollowingReLU] = {}
    refused: set[str] = set()
    for node in graph.nodes:
        if node.op != "call_module" or str(node.target) not in wanted:
            continue
        name = str(node.target)
        rec = _site(node, name, modules)
        if rec is None or name in refused or (name in found and found[name].via != rec.via):
            refused.add(name)
            found.pop(name, None)
        else:
            found[name] = rec
    return found, ""


def _site(node: torch.fx.Node, name: str, modules: dict[str, nn.Module]) -> Optional[FollowingReLU]:
    nxt = _only_user(node)
    if nxt is None:
        return None
    c_out = int(getattr(modules[name], "out_channels", 0))
    if _is_relu(nxt, modules):
        ones = torch.ones(c_out, dtype=torch.float64)
        return FollowingReLU(name, _relu_label(nxt), ones, torch.zeros_like(ones))
    if nxt.op != "call_module" or type(modules.get(str(nxt.target))) is not nn.BatchNorm2d:
        return None
    bn: Any = modules[str(nxt.target)]
    affine = _bn_affine(bn)
    after = _only_user(nxt)
    if affine is None or after is None or not _is_relu(after, modules) or affine[0].numel() != c_out:
        return None
    return FollowingReLU(name, f"BatchNorm2d {nxt.target} + {_relu_label(after)}", affine[0], affine[1])
